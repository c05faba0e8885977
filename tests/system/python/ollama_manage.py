"""Drive model management through a Switchyard sidecar with the official
`ollama` Python client.

Usage: ollama_manage.py HOST EXISTING_MODEL
Environment:
  EXPECT_TOTAL   the total of a pulled model's layer the client must see on
                 every digest line and reach at the end of the streamed pull
                 (the layer's size, however many backends pull it)

Checks pull streamed (progress lines, a digest whose completed never goes
down and ends at EXPECT_TOTAL, success last) and not streamed, copy of
EXISTING_MODEL, its delete, delete of an unknown model (404), and a blob
upload (`create_blob` of BLOB_SIZE bytes, printed as `BLOB_DIGEST=<digest>`)
followed by a create from it. Prints every failure and exits 1 if there was
any.
"""
import hashlib
import os
import sys
import tempfile

import ollama

from checks import check, run

BLOB_SIZE = 256 * 1024


def main():
    host, existing = sys.argv[1], sys.argv[2]
    expect_total = int(os.environ["EXPECT_TOTAL"])
    client = ollama.Client(host=host, timeout=20)

    statuses, completed, totals = [], [], []
    for part in client.pull("pulled-streamed", stream=True):
        statuses.append(part.status)
        if part.digest:
            totals.append(part.total or 0)
            completed.append(part.completed or 0)
    check(statuses and statuses[-1] == "success",
          f"streamed pull: ends with success, got {statuses!r}")
    check(statuses.count("success") == 1, f"streamed pull: one success, got {statuses!r}")
    check("pulling manifest" in statuses, f"streamed pull: manifest line, got {statuses!r}")
    check(completed == sorted(completed),
          f"streamed pull: completed never goes down, got {completed!r}")
    check(totals and set(totals) == {expect_total} and completed[-1] == expect_total,
          f"streamed pull: last digest line {expect_total}/{expect_total}, "
          f"got totals {totals!r} completed {completed!r}")

    r = client.pull("pulled-plain", stream=False)
    check(r.status == "success", f"plain pull: status success, got {r!r}")

    r = client.copy(existing, "copied")
    check(r.status == "success", f"copy: status success, got {r!r}")

    r = client.delete(existing)
    check(r.status == "success", f"delete: status success, got {r!r}")

    try:
        client.delete("no-such-model")
        check(False, "delete unknown: no error raised")
    except ollama.ResponseError as err:
        check(err.status_code == 404 and "no-such-model" in str(err.error),
              f"delete unknown: status {err.status_code}, error {err.error!r}")

    data = bytes(range(256)) * (BLOB_SIZE // 256)
    with tempfile.NamedTemporaryFile(suffix=".gguf", delete=False) as f:
        f.write(data)
        path = f.name
    try:
        digest = client.create_blob(path)
    finally:
        os.unlink(path)
    expected = "sha256:" + hashlib.sha256(data).hexdigest()
    check(digest == expected, f"create_blob: digest {digest!r}, expected {expected!r}")
    print(f"BLOB_DIGEST={digest}", flush=True)
    r = client.create(model="from-blob", files={"model.gguf": digest}, stream=False)
    check(r.status == "success", f"create from blob: status success, got {r!r}")


if __name__ == "__main__":
    run(main, "all model management checks passed")
