//! `photon-proxy`: parse the configuration, set up tracing, run the library's `serve`; or make
//! this site's key and CSR (`keygen`).

use std::{net::TcpListener, process::ExitCode, time::Duration};

use clap::Parser;
use photon::{crypto::ca, wire::ProxyId};
use photon_proxy::config::{app_keys_from_env, Cli, Command};

/// mimalloc rather than glibc's allocator: cheaper per request and no more memory per stream
/// (why, in Cargo.toml).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    photon::ops::init_tracing(cli.serve.ops.log_format);
    let outcome = match &cli.command {
        Some(Command::Keygen { proxy_id, out, force }) => keygen(proxy_id, out, *force),
        None => serve(&cli),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("photon-proxy: {message}");
            ExitCode::FAILURE
        }
    }
}

fn keygen(proxy_id: &str, out: &std::path::Path, force: bool) -> Result<(), String> {
    let proxy_id = ProxyId::parse(proxy_id).map_err(|e| format!("--proxy-id: {e}"))?;
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let key_path = out.join(format!("{proxy_id}.priv.pem"));
    let csr_path = out.join(format!("{proxy_id}.csr.pem"));
    if key_path.exists() && !force {
        return Err(format!(
            "{} exists and may be the key this site runs with; use another --out (and replace the key once \
             its certificate is signed), or --force to replace it",
            key_path.display()
        ));
    }
    let (key, csr) = ca::keygen(&proxy_id).map_err(|e| e.to_string())?;
    ca::write_private(&key_path, &key).map_err(|e| e.to_string())?;
    std::fs::write(&csr_path, csr).map_err(|e| format!("cannot write {}: {e}", csr_path.display()))?;
    println!("private key: {}\nCSR for the CA: {}", key_path.display(), csr_path.display());
    Ok(())
}

fn serve(cli: &Cli) -> Result<(), String> {
    let config = cli.serve.validate(app_keys_from_env(std::env::vars()))?;
    let listener = TcpListener::bind(cli.serve.bind_addr)
        .map_err(|e| format!("cannot listen on {} (BIND_ADDR): {e}", cli.serve.bind_addr))?;
    actix_web::rt::System::new().block_on(async move {
        let running =
            photon_proxy::serve(config, listener, Duration::from_secs(30)).await.map_err(|e| e.to_string())?;
        photon::ops::shutdown::run_until_signalled(running).await.map_err(|e| e.to_string())
    })
}
