//! `photon-broker`: parse the configuration, set up tracing, run the library's `serve`, or the
//! CA's subcommands.

use std::{net::TcpListener, process::ExitCode};

use clap::Parser;
use photon::{
    config::{broker_id_setting, CaAction, Cli, Command},
    crypto::ca,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    photon::ops::init_tracing(cli.serve.ops.log_format);
    let outcome = match cli.command {
        Some(Command::Ca { action }) => run_ca(action),
        None => serve(&cli),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("photon-broker: {message}");
            ExitCode::FAILURE
        }
    }
}

fn serve(cli: &Cli) -> Result<(), String> {
    // Before any thread or socket exists: this may exec the broker again.
    photon::ops::memory::small_thread_caches();
    let config = cli.serve.validate()?;
    let listener = TcpListener::bind(cli.serve.bind_addr)
        .map_err(|e| format!("cannot listen on {} (BIND_ADDR): {e}", cli.serve.bind_addr))?;
    actix_web::rt::System::new().block_on(async move {
        let running = photon::serve(config, listener).map_err(|e| e.to_string())?;
        photon::ops::shutdown::run_until_signalled(running).await.map_err(|e| e.to_string())
    })
}

fn run_ca(action: CaAction) -> Result<(), String> {
    match action {
        CaAction::Init { dir, broker_url, broker_id, days } => {
            let broker_id = broker_id_setting(&broker_url, broker_id.as_deref())?;
            ca::init(&dir, &broker_id, days).map_err(|e| e.to_string())?;
            println!("CA for broker {broker_id} written to {}", dir.display());
        }
        CaAction::Sign { dir, broker_url, broker_id, csr, days } => {
            let broker_id = broker_id_setting(&broker_url, broker_id.as_deref())?;
            let csr_pem = std::fs::read_to_string(&csr).map_err(|e| format!("cannot read {}: {e}", csr.display()))?;
            let (proxy, path) = ca::sign(&dir, &broker_id, &csr_pem, days).map_err(|e| e.to_string())?;
            let serial = ca::read_to_string(&path)
                .and_then(|pem| photon::crypto::cert::serial_of(&pem))
                .map(|s| ca::hex_serial(&s))
                .map_err(|e| e.to_string())?;
            println!("issued certificate for {proxy} (serial {serial}): {}", path.display());
        }
        CaAction::Revoke { dir, proxy_id: Some(proxy_id), serial: None } => {
            let proxy = photon::wire::ProxyId::parse(&proxy_id).map_err(|e| e.to_string())?;
            let serial = ca::revoke(&dir, &proxy).map_err(|e| e.to_string())?;
            println!(
                "revoked the certificate of {proxy} (serial {serial}); {} updated",
                dir.join(ca::CRL_FILE).display()
            );
        }
        CaAction::Revoke { dir, proxy_id: None, serial: Some(serial) } => {
            let bytes = ca::parse_serial(&serial).map_err(|e| e.to_string())?;
            ca::revoke_serial(&dir, &bytes).map_err(|e| e.to_string())?;
            println!(
                "revoked the certificate with serial {}; {} updated",
                ca::hex_serial(&bytes),
                dir.join(ca::CRL_FILE).display()
            );
        }
        CaAction::Revoke { .. } => return Err("give --proxy-id or --serial, not both".into()),
    }
    Ok(())
}
