//! `gomote put` and `gomote gettar` through the coordinator's proxy, against the same
//! transfers made directly to a buildlet in the same run: a release buildlet the bench
//! starts, and an in-process coordinator whose local pool runs the same binary. Both
//! proxy front ends are timed: bulk connections (the client's default) and gRPC.
//!
//! The buildlet's work (gunzip and extract; tar and gzip) is the same on every path, so
//! the ratios show what the proxy costs, not raw transport speed (that is the revdial
//! group's business).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use coordinator::client::{CreateEvent, FarmClient};
use futures::StreamExt;

use super::bench::{Figure, make_tree, median, start_buildlet, walk_bytes};

const ROUNDS: usize = 3;
/// Small calls per path for the call figure.
const CALLS: usize = 500;
const TREE_BYTES: usize = 200 << 20;

pub async fn gomote_benches(release: &Path, out_dir: &Path) -> Result<Vec<Figure>> {
    let work = out_dir.join("gomote-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let tree = out_dir.join("tree-200mb");
    make_tree(&tree, TREE_BYTES)?;
    let tree_mb = walk_bytes(&tree) as f64 / 1e6;
    let mut tarball = Vec::new();
    buildlet::tarball::write_tar_gz(&tree, &mut tarball)?;
    let tarball = Bytes::from(tarball);

    let direct = start_buildlet(release, &work.join("direct")).await?;
    let config = format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"

[[host_types]]
name = "local"
pool = {{ kind = "local", count = 1 }}

[[builders]]
name = "linux-amd64-bench"
host_type = "local"
steps = [{{ name = "none", command = ["true"] }}]
"#,
        data = work.join("data").display(),
    );
    let running = super::bench_farm::start_coordinator(release, &config).await?;
    let result = async {
        let (_, token) = running
            .access
            .issue("bench", coordinator::access::Role::Admin, "gomote bench")
            .await?;
        let bulk = FarmClient::connect(
            &running.addr.to_string(),
            &running.ca_pem,
            Some(&token),
            Duration::from_secs(10),
        )
        .await?;
        let grpc = bulk.clone().without_bulk_connections();
        let inst = create(&bulk, "linux-amd64-bench").await?;

        let mut t = Times::default();
        for round in 0..ROUNDS {
            let dir = format!("r{round}");
            t.put_direct.push(
                timed(async {
                    let src = std::io::Cursor::new(tarball.clone());
                    direct.client.put_tar(&dir, src, None).await?;
                    Ok(())
                })
                .await?,
            );
            for (client, times, how) in [
                (&bulk, &mut t.put_bulk, "bulk"),
                (&grpc, &mut t.put_grpc, "grpc"),
            ] {
                let dir = format!("{dir}-{how}");
                let chunks = chunks_of(&tarball);
                times.push(
                    timed(async {
                        client.put_tar(&inst, &dir, chunks).await?;
                        Ok(())
                    })
                    .await?,
                );
            }
            let mut got = 0u64;
            t.get_direct.push(
                timed(async {
                    got = direct
                        .client
                        .get_tar("r0", &mut tokio::io::sink(), None)
                        .await?;
                    Ok(())
                })
                .await?,
            );
            for (client, times) in [(&bulk, &mut t.get_bulk), (&grpc, &mut t.get_grpc)] {
                let mut n = 0u64;
                times.push(
                    timed(async {
                        let mut s = client.get_tar(&inst, "r0-bulk").await?;
                        while let Some(c) = s.next().await {
                            n += c?.len() as u64;
                        }
                        Ok(())
                    })
                    .await?,
                );
                // Same tree, same gzip: sizes agree within the headers' differences.
                if n.abs_diff(got) > got / 100 {
                    bail!("gettar through the proxy gave {n} bytes, directly {got}");
                }
            }
        }
        // A small call (a 64-byte WriteFile), one after another, both ways.
        for _ in 0..CALLS {
            let start = Instant::now();
            direct
                .client
                .write_file("small", 0o644, vec![7u8; 64])
                .await?;
            t.call_direct.push(start.elapsed());
            let start = Instant::now();
            bulk.write_file(&inst, "small", 0o644, vec![7u8; 64])
                .await?;
            t.call_proxy.push(start.elapsed());
        }
        let _ = bulk.destroy_instance(&inst).await;
        Ok(t)
    }
    .await;
    running.stop(Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&work);
    let t = result?;

    let figure = |name: &str, proxy: &[Duration], direct: &[Duration], what: &str| {
        let (p, d) = (median(proxy.to_vec()), median(direct.to_vec()));
        Figure {
            name: name.into(),
            measured: tree_mb / p.as_secs_f64(),
            baseline: tree_mb / d.as_secs_f64(),
            unit: "MB/s".into(),
            ratio: d.as_secs_f64() / p.as_secs_f64(),
            note: format!(
                "{tree_mb:.0} MB tree ({} MB tar.gz), {what}; baseline: the same transfer straight to a buildlet; median of {ROUNDS}",
                tarball.len() / 1_000_000
            ),
        }
    };
    let (p, d) = (median(t.call_proxy), median(t.call_direct));
    let call = Figure {
        name: "gomote_call_p50_vs_direct".into(),
        measured: p.as_secs_f64() * 1e6,
        baseline: d.as_secs_f64() * 1e6,
        unit: "us".into(),
        ratio: d.as_secs_f64() / p.as_secs_f64(),
        note: format!(
            "a 64-byte WriteFile through the coordinator (two gRPC hops) vs straight to a buildlet, p50 of {CALLS}"
        ),
    };
    Ok(vec![
        call,
        figure(
            "gomote_put_vs_direct",
            &t.put_bulk,
            &t.put_direct,
            "through the coordinator, bulk connections both legs",
        ),
        figure(
            "gomote_put_grpc_vs_direct",
            &t.put_grpc,
            &t.put_direct,
            "through the coordinator, gRPC to it, bulk to the buildlet",
        ),
        figure(
            "gomote_gettar_vs_direct",
            &t.get_bulk,
            &t.get_direct,
            "through the coordinator, bulk connections both legs",
        ),
        figure(
            "gomote_gettar_grpc_vs_direct",
            &t.get_grpc,
            &t.get_direct,
            "through the coordinator, gRPC to it, bulk to the buildlet",
        ),
    ])
}

#[derive(Default)]
struct Times {
    put_direct: Vec<Duration>,
    put_bulk: Vec<Duration>,
    put_grpc: Vec<Duration>,
    get_direct: Vec<Duration>,
    get_bulk: Vec<Duration>,
    get_grpc: Vec<Duration>,
    call_direct: Vec<Duration>,
    call_proxy: Vec<Duration>,
}

async fn timed(f: impl std::future::Future<Output = Result<()>>) -> Result<Duration> {
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(600), f)
        .await
        .context("a transfer took over 600 s")??;
    Ok(t.elapsed())
}

/// The tarball in 1 MiB pieces, as `gomote put` reads a file.
fn chunks_of(data: &Bytes) -> futures::stream::Iter<std::vec::IntoIter<Bytes>> {
    let pieces: Vec<Bytes> = (0..data.len())
        .step_by(1 << 20)
        .map(|i| data.slice(i..(i + (1 << 20)).min(data.len())))
        .collect();
    futures::stream::iter(pieces)
}

async fn create(client: &FarmClient, builder: &str) -> Result<String> {
    let mut s = client.create_instance(builder).await?;
    while let Some(ev) = s.next().await {
        if let CreateEvent::Ready(i) = ev? {
            return Ok(i.name);
        }
    }
    Err(anyhow!(
        "create {builder}: the stream ended without an instance"
    ))
}
