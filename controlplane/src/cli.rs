//! The `understudy` command line: `serve` runs the control plane; the other
//! subcommands are a thin client of its JSON API.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "understudy",
    version,
    about = "Understudy control plane and client"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane.
    Serve {
        /// Desired-state file (JSON): listener, filter and services. Every
        /// accepted API change is written back to it, so a restart resumes.
        #[arg(long, env = "UNDERSTUDY_STATE")]
        state: PathBuf,
        /// Address of the ADS gRPC server Envoy connects to.
        #[arg(long, default_value = "127.0.0.1:18000", env = "UNDERSTUDY_XDS_ADDR")]
        xds_addr: SocketAddr,
        /// Address of the JSON API.
        #[arg(long, default_value = "127.0.0.1:18080", env = "UNDERSTUDY_API_ADDR")]
        api_addr: SocketAddr,
    },
    /// List services and their canary weights.
    Services {
        #[arg(long, default_value = "http://127.0.0.1:18080", env = "UNDERSTUDY_API")]
        api: String,
    },
    /// Set a service's canary weight (0..=100).
    SetWeight {
        service: String,
        weight: i64,
        #[arg(long, default_value = "http://127.0.0.1:18080", env = "UNDERSTUDY_API")]
        api: String,
    },
    /// Show connected Envoys: ACKed versions and NACKs.
    Envoys {
        #[arg(long, default_value = "http://127.0.0.1:18080", env = "UNDERSTUDY_API")]
        api: String,
    },
}

/// Runs a client subcommand against the API and prints the JSON answer.
pub async fn client(command: Command) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let response = match &command {
        Command::Services { api } => http.get(format!("{api}/v1/services")).send().await,
        Command::SetWeight {
            service,
            weight,
            api,
        } => {
            http.put(format!("{api}/v1/services/{service}/canary-weight"))
                .json(&serde_json::json!({ "weight": weight }))
                .send()
                .await
        }
        Command::Envoys { api } => http.get(format!("{api}/v1/envoys")).send().await,
        Command::Serve { .. } => bail!("serve is not a client command"),
    }
    .context("calling the control plane API")?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.context("reading the API's answer")?;
    println!("{}", serde_json::to_string_pretty(&body)?);
    if !status.is_success() {
        bail!("the API answered {status}");
    }
    Ok(())
}
