//! One function per subcommand: call the control plane, convert the answer
//! into a view, print it in the chosen format. No state survives a command.

use std::{future::Future, io::Write};

use crate::{
    cli::{Cli, Command, OutputFormat},
    client::ControlPlaneClient,
    error::CliError,
    render,
    view::{AffinityView, ChoiceView, DrainView, ModelsView, SessionsView, StateView, UsageView},
};

/// Runs the parsed command line, printing to `out`.
///
/// `terminal` says whether `out` is a terminal (then `watch` redraws in
/// place). `watch` returns `Ok` when `shutdown` completes (Ctrl-C), and an
/// error when the stream breaks or the control plane ends it; other
/// commands ignore `shutdown`.
pub async fn run(
    cli: &Cli,
    out: &mut dyn Write,
    terminal: bool,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let mut client = ControlPlaneClient::connect(&cli.control_plane).await?;
    let format = cli.output;
    match &cli.command {
        Command::Endpoints => {
            let state = StateView::try_from(client.get_state().await?)?;
            emit(out, format, &state, render::endpoints)
        }
        Command::Models => {
            let state = StateView::try_from(client.get_state().await?)?;
            emit(out, format, &ModelsView::from(&state), render::models)
        }
        Command::Usage => {
            let state = StateView::try_from(client.get_state().await?)?;
            emit(out, format, &UsageView::from(&state), render::usage)
        }
        Command::Sessions => {
            let sessions = SessionsView::from(client.list_sessions().await?);
            emit(out, format, &sessions, render::sessions)
        }
        Command::Affinity { limit } => {
            let affinity = AffinityView::from(client.list_affinity(*limit).await?);
            emit(out, format, &affinity, render::affinity)
        }
        Command::Choose {
            model,
            affinity_key,
        } => {
            let answer = client
                .choose_dry_run(model, affinity_key.as_deref())
                .await?;
            emit(
                out,
                format,
                &ChoiceView::from_proto(model, answer)?,
                render::choice,
            )
        }
        Command::Drain { endpoint } => {
            let view = DrainView::try_from(client.set_draining(endpoint, true).await?)?;
            emit(out, format, &view, render::drain)
        }
        Command::Undrain { endpoint } => {
            let view = DrainView::try_from(client.set_draining(endpoint, false).await?)?;
            emit(out, format, &view, render::drain)
        }
        Command::Watch => watch(&mut client, out, format, terminal, shutdown).await,
    }
}

/// Prints a view as pretty JSON or through its table renderer.
fn emit<V: serde::Serialize>(
    out: &mut dyn Write,
    format: OutputFormat,
    view: &V,
    table: fn(&mut dyn Write, &V) -> std::io::Result<()>,
) -> Result<(), CliError> {
    match format {
        OutputFormat::Json => render::json_pretty(out, view)?,
        OutputFormat::Table => table(out, view)?,
    }
    out.flush()?;
    Ok(())
}

/// Follows `WatchUsage` until `shutdown` (`Ok`) or the end of the stream
/// (an error: the control plane shut down or restarted).
async fn watch(
    client: &mut ControlPlaneClient,
    out: &mut dyn Write,
    format: OutputFormat,
    terminal: bool,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let mut stream = client.watch_usage().await?;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let next = tokio::select! {
            // Ctrl-C wins over a ready update: stop promptly.
            biased;
            () = &mut shutdown => return Ok(()),
            next = stream.message() => next,
        };
        let state = match next {
            Ok(Some(state)) => StateView::try_from(state)?,
            Ok(None) => {
                return Err(CliError::StreamBroken {
                    addr: client.addr().to_owned(),
                    message: "the control plane ended the stream (it shut down or restarted)"
                        .to_owned(),
                });
            }
            Err(status) => {
                return Err(CliError::StreamBroken {
                    addr: client.addr().to_owned(),
                    message: format!("{:?}: {}", status.code(), status.message()),
                });
            }
        };
        match format {
            OutputFormat::Json => render::json_line(out, &state)?,
            OutputFormat::Table => {
                if terminal {
                    write!(out, "{}", render::CLEAR_SCREEN)?;
                }
                render::watch_frame(out, &state)?;
                if !terminal {
                    // Frames one after another: a blank line between them.
                    writeln!(out)?;
                }
            }
        }
        out.flush()?;
    }
}
