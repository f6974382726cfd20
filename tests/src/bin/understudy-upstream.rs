//! `understudy-upstream`: the programmable upstream server as a process.
//!
//! `understudy-upstream --listen 127.0.0.1:8081 --label v1 [--behavior '{"latency":[{"pct":5,"ms":300}],"default_ms":5}']`

use clap::Parser;
use understudy_e2e::upstream::{Behavior, Upstream, router};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: std::net::SocketAddr,
    /// Returned in every answer's `x-upstream-version` header.
    #[arg(long, default_value = "v1")]
    label: String,
    /// Initial behaviour as JSON (see `Behavior`); change it later with PUT /_upstream/behavior.
    #[arg(long)]
    behavior: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let behavior: Behavior = match &args.behavior {
        Some(json) => serde_json::from_str(json)?,
        None => Behavior::default(),
    };
    let state = Upstream::new(&args.label, behavior)?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!(
        "understudy-upstream {} listening on {}",
        args.label,
        listener.local_addr()?
    );
    axum::serve(listener, router(state)).await?;
    Ok(())
}
