//! `migratory certs`: a pool CA and the certificates of a pool file's
//! servers and of its operator, written where the file's `[tls]` section
//! says (rcgen; ECDSA P-256, valid ten years).

use std::path::PathBuf;

use clap::Args;
use migratory::PoolCerts;

use crate::config::PoolConfig;

/// Options of `migratory certs`.
#[derive(Args, Debug)]
pub struct CertsArgs {
    /// The pool's configuration file.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Replace files that exist (a new CA: every server, client and
    /// operator must then get the new files).
    #[arg(long)]
    force: bool,
}

/// Makes the files; refuses to overwrite any unless `--force`.
pub fn run(args: CertsArgs) -> Result<bool, String> {
    let config = PoolConfig::load(&args.config).map_err(|e| e.to_string())?;
    let Some(tls) = &config.tls else {
        return Err(format!(
            "{}: insecure_plaintext = true: the pool uses no certificates",
            args.config.display()
        ));
    };
    let mut files = vec![
        tls.ca.clone(),
        tls.dir.join(format!("{}.pem", migratory::OPERATOR_ID)),
        tls.dir.join(format!("{}.key", migratory::OPERATOR_ID)),
    ];
    for s in &config.servers {
        files.push(s.cert.clone());
        files.push(s.key.clone());
    }
    if !args.force {
        if let Some(f) = files.iter().find(|f| f.exists()) {
            return Err(format!(
                "{} exists: pass --force to make a new pool CA and certificates",
                f.display()
            ));
        }
    }
    let pool = PoolCerts::generate(&tls.pool_name).map_err(|e| e.to_string())?;
    let ids: Vec<&str> = config.servers.iter().map(|s| s.id.as_str()).collect();
    // Everything into the folder, then servers that name their own files
    // get theirs there.
    pool.write_dir(&tls.dir, &ids).map_err(|e| e.to_string())?;
    let write = |src: PathBuf, dst: &PathBuf| -> Result<(), String> {
        if src != *dst {
            std::fs::copy(&src, dst)
                .map_err(|e| format!("{}: cannot write: {e}", dst.display()))?;
            std::fs::remove_file(&src).map_err(|e| format!("{}: {e}", src.display()))?;
        }
        Ok(())
    };
    write(tls.dir.join("ca.pem"), &tls.ca)?;
    for s in &config.servers {
        write(tls.dir.join(format!("{}.pem", s.id)), &s.cert)?;
        write(tls.dir.join(format!("{}.key", s.id)), &s.key)?;
    }
    println!(
        "pool CA and certificates for {} written to {} (CA: {}); keep the .key files secret",
        ids.join(", "),
        tls.dir.display(),
        tls.ca.display()
    );
    Ok(true)
}
