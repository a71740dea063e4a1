//! Sealing and opening cost (SECURITY.md's budget): a 100 B and a 1 MiB body for 1 and 100
//! recipient proxies, plus the one-time pairwise key derivation per peer. And the passes a 1 MiB
//! body's round trip is made of, one by one (`1 MiB pass/…`), which bound how fast that round
//! trip can be. Figures and the command are in docs/BENCHMARKS.md.

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
    passes(c);
}

/// The passes over a 1 MiB body that a round trip makes, each alone: the AEAD (sealing and
/// opening each make one), the ciphertext's digest (BLAKE3: binding and request MAC; SHA-256,
/// which it was until round 16, beside it), base64 both ways, checking JSON text, and one copy.
fn passes(c: &mut Criterion) {
    use chacha20poly1305::{aead::Aead, KeyInit, XChaCha20Poly1305, XNonce};
    use sha2::{Digest, Sha256};

    let body = vec![b'x'; 1 << 20];
    let wire = vec![b'x'; (1 << 20) * 4 / 3];
    let json = format!("\"{}\"", "x".repeat((1 << 20) - 2));
    let b64 = base64_simd::STANDARD.encode_to_string(&body);
    let aead = XChaCha20Poly1305::new(&[7u8; 32].into());
    let nonce = XNonce::from_slice(&[1u8; 24]);
    let mut g = c.benchmark_group("1 MiB pass");
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("XChaCha20-Poly1305 seal", |b| b.iter(|| aead.encrypt(nonce, body.as_slice()).unwrap()));
    g.bench_function("SHA-256", |b| b.iter(|| Sha256::digest(&body)));
    g.bench_function("ciphertext digest (BLAKE3)", |b| b.iter(|| photon::crypto::ct_digest(&body)));
    g.bench_function("seal, then SHA-256 of the ciphertext (one thread)", |b| {
        b.iter(|| Sha256::digest(aead.encrypt(nonce, body.as_slice()).unwrap()))
    });
    g.bench_function("seal and digest of the ciphertext (crypto::bulk, two threads)", |b| {
        b.iter(|| photon::crypto::bulk::seal(&[7; 32], &[1; 24], b"", &body))
    });
    let ct = aead.encrypt(nonce, body.as_slice()).unwrap();
    g.bench_function("XChaCha20-Poly1305 open (one thread)", |b| {
        b.iter(|| aead.decrypt(nonce, ct.as_slice()).unwrap())
    });
    g.bench_function("XChaCha20-Poly1305 open (crypto::bulk)", |b| {
        b.iter(|| photon::crypto::bulk::open(&[7; 32], &[1; 24], b"", &ct).unwrap())
    });
    g.bench_function("SHA-256 of 1.33 MiB (base64 in JSON)", |b| b.iter(|| Sha256::digest(&wire)));
    g.bench_function("base64 encode (SIMD)", |b| b.iter(|| base64_simd::STANDARD.encode_to_string(&body)));
    g.bench_function("base64 decode (SIMD)", |b| b.iter(|| base64_simd::STANDARD.decode_to_vec(&b64).unwrap()));
    g.bench_function("JSON check (serde_json RawValue)", |b| {
        b.iter(|| serde_json::from_str::<&serde_json::value::RawValue>(&json).unwrap().get().len())
    });
    g.bench_function("copy of 1.33 MiB", |b| b.iter(|| wire.clone()));
    g.finish();

    // The AEAD of a small body, which every task and result has: crypto::bulk on the calling
    // thread against the crate it replaces (with the digest the crate's caller adds: SHA-256
    // until round 16, BLAKE3 in crypto::bulk now).
    let small = [b'x'; 100];
    let mut g = c.benchmark_group("100 B");
    g.bench_function("XChaCha20-Poly1305 seal and SHA-256 (chacha20poly1305)", |b| {
        b.iter(|| Sha256::digest(aead.encrypt(nonce, small.as_slice()).unwrap()))
    });
    g.bench_function("XChaCha20-Poly1305 seal and BLAKE3 (crypto::bulk)", |b| {
        b.iter(|| photon::crypto::bulk::seal(&[7; 32], &[1; 24], b"", &small))
    });
    let ct = aead.encrypt(nonce, small.as_slice()).unwrap();
    g.bench_function("XChaCha20-Poly1305 open (chacha20poly1305)", |b| {
        b.iter(|| aead.decrypt(nonce, ct.as_slice()).unwrap())
    });
    g.bench_function("XChaCha20-Poly1305 open (crypto::bulk)", |b| {
        b.iter(|| photon::crypto::bulk::open(&[7; 32], &[1; 24], b"", &ct).unwrap())
    });
    g.finish();
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
