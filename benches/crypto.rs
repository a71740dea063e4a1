//! Sealing and opening cost (SECURITY.md's budget): a 100 B and a 1 MiB body for 1 and 100
//! recipient proxies, plus the one-time pairwise key derivation per peer. Figures and the
//! command are in docs/BENCHMARKS.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use p256::{PublicKey, SecretKey};
use photon::{
    crypto::e2e::{open, pair_keys, seal, wrap_for, KeyId, PairKey, Party, Recipient, Subject},
    wire::{AppId, FailureStrategy, ProxyId},
};
use serde_json::json;

struct Site {
    proxy: ProxyId,
    secret: SecretKey,
    public: PublicKey,
}

fn site(i: usize) -> Site {
    let secret = SecretKey::random(&mut rand::rngs::OsRng);
    Site { proxy: ProxyId::parse(&format!("proxy{i}.broker")).unwrap(), public: secret.public_key(), secret }
}

fn keys(me: &Site, peer: &Site) -> (PairKey, PairKey) {
    pair_keys(
        &me.secret,
        &Party { proxy: &me.proxy, key: &me.public },
        &Party { proxy: &peer.proxy, key: &peer.public },
    )
}

fn bench(c: &mut Criterion) {
    let sender = site(0);
    let sites: Vec<Site> = (1..=100).map(site).collect();
    let to_keys: Vec<PairKey> = sites.iter().map(|s| keys(&sender, s).0).collect();
    let from = AppId::parse("app.proxy0.broker").unwrap();
    let metadata = json!({"kind": "bench"});
    let id = uuid::Uuid::new_v4();

    c.bench_function("pairwise key derivation (once per peer)", |b| b.iter(|| keys(&sender, &sites[0])));

    let mut seal_group = c.benchmark_group("seal");
    for size in [100usize, 1 << 20] {
        let body = vec![b'x'; size];
        for n in [1usize, 100] {
            let to = apps(&sites[..n]);
            let subject = task(id, &from, &to, &metadata);
            let rs = recipients(&sites[..n], &to_keys[..n]);
            seal_group.throughput(Throughput::Bytes(size as u64));
            seal_group.bench_with_input(
                BenchmarkId::new(format!("{size} B"), format!("{n} recipients")),
                &n,
                |b, _| b.iter(|| seal(&subject, KeyId::of(&sender.public), 1, Some(60_000), &rs, &body)),
            );
        }
    }
    seal_group.finish();

    let mut open_group = c.benchmark_group("open");
    let receiver = &sites[n_last(&sites)];
    let (_, from_sender) = keys(receiver, &sender);
    for size in [100usize, 1 << 20] {
        let body = vec![b'x'; size];
        for n in [1usize, 100] {
            // The receiver is the last of the n recipients (worst case for finding its key).
            let last_n = sites.len() - n..;
            let to = apps(&sites[last_n.clone()]);
            let subject = task(id, &from, &to, &metadata);
            let rs = recipients(&sites[last_n.clone()], &to_keys[last_n]);
            let env = seal(&subject, KeyId::of(&sender.public), 1, Some(60_000), &rs, &body);
            open_group.throughput(Throughput::Bytes(size as u64));
            open_group.bench_with_input(
                BenchmarkId::new(format!("{size} B"), format!("{n} recipients")),
                &n,
                |b, _| {
                    b.iter(|| {
                        let wrap = wrap_for(&env, &receiver.proxy).unwrap();
                        open(&env, &subject, wrap, &from_sender).unwrap()
                    })
                },
            );
        }
    }
    open_group.finish();
}

fn task<'a>(id: uuid::Uuid, from: &'a AppId, to: &'a [AppId], metadata: &'a serde_json::Value) -> Subject<'a> {
    Subject::Task { id, from, to, failure_strategy: &FailureStrategy::Discard, metadata }
}

fn apps(sites: &[Site]) -> Vec<AppId> {
    sites.iter().map(|s| s.proxy.app("app").unwrap()).collect()
}

fn recipients<'a>(sites: &'a [Site], keys: &'a [PairKey]) -> Vec<Recipient<'a>> {
    sites.iter().zip(keys).map(|(s, k)| Recipient { proxy: &s.proxy, kid: KeyId::of(&s.public), key: k }).collect()
}

fn n_last(sites: &[Site]) -> usize {
    sites.len() - 1
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
