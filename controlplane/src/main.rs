//! The `understudy` binary: parse arguments, then hand over to the library.

use clap::Parser;
use understudy_controlplane::cli::{Cli, Command, client};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            state,
            xds_addr,
            api_addr,
        } => {
            let store = understudy_controlplane::store::Store::open(&state)?;
            let xds = tokio::net::TcpListener::bind(xds_addr).await?;
            let api = tokio::net::TcpListener::bind(api_addr).await?;
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            understudy_controlplane::run(store, xds, api, shutdown).await?;
        }
        other => client(other).await?,
    }
    Ok(())
}
