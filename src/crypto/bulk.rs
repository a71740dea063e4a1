//! XChaCha20-Poly1305 over a message body, on two cores when the body is large.
//!
//! The AEAD is the one `chacha20poly1305::XChaCha20Poly1305` computes, byte for byte (the tests
//! compare them): ChaCha20 under the HChaCha20 subkey, its first keystream block keying
//! Poly1305, the body encrypted from block 1, and the tag over `aad ‖ pad ‖ ct ‖ pad ‖ lengths`.
//! It is put together here from RustCrypto's `chacha20` (0.10, for its AVX-512 backend; the
//! crate builds on 0.9) and `poly1305` so that the passes over a large body can run beside each
//! other instead of one after another:
//! - sealing encrypts the body in 64 KiB chunks while a helper thread MACs and hashes
//!   ([`ct_digest`](super::ct_digest)) each finished chunk, then writes the tag;
//! - a large body is opened (`e2e::open`) by decrypting it ([`decrypt_unchecked`]) while a
//!   helper checks its tag and hashes it ([`check_and_digest`]) and checks the wrapped key;
//!   [`open`], for small bodies, checks the tag before it decrypts anything, as the crate does.
//!
//! The helpers are long-lived threads (a rayon pool of one fewer than the cores, at least one):
//! a thread started per body ran on the busy core that started it, after the work it was to
//! overlap. When a body hands a helper its half, the helpers are first kept off the caller's core
//! ([`steer_helpers`]); woken without that, Linux often put the helper on its waker's core, and
//! the two took turns there while the other core idled. Below [`PARALLEL_MIN`] everything runs
//! on the calling thread, as the crate does it: handing work over costs more than it saves there.

use chacha20::{
    cipher::{KeyIvInit, StreamCipher, StreamCipherSeek},
    XChaCha20,
};
use poly1305::{
    universal_hash::{KeyInit, UniversalHash},
    Poly1305,
};
use std::sync::{
    atomic::{AtomicI32, AtomicUsize, Ordering},
    Mutex, OnceLock,
};
use zeroize::Zeroize;

use super::CtHasher;
use crate::ops::cpu;

// The keystream the cipher buffers (the rest of a block it used part of: the MAC key's, a wrapped
// key's) is wiped when it is dropped: `cipher`'s `zeroize` feature, which chacha20's does not
// turn on by itself.
const _: () = {
    const fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
    wiped_on_drop::<XChaCha20>();
};

/// Bytes of the Poly1305 tag at the end of a ciphertext.
pub const TAG_LEN: usize = 16;
/// Bodies from this size are sealed and opened on two threads.
pub const PARALLEL_MIN: usize = 256 * 1024;
/// The pipeline's step: small enough to stay in cache between the two threads, a multiple of
/// Poly1305's 16-byte block so that each chunk but the last is MACed unpadded.
const CHUNK: usize = 64 * 1024;
/// Spins of the helper before it yields while waiting for a chunk (about as long as a chunk
/// takes to encrypt).
const SPINS: u32 = 4_000;
/// ChaCha20's block: the first one keys Poly1305, the body starts at the second.
const BLOCK: u64 = 64;

/// A tag that did not verify, or a ciphertext too short to hold one.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused;

/// The cipher positioned at the body, and Poly1305 keyed and fed the associated data.
fn start(key: &[u8; 32], nonce: &[u8; 24], aad: &[u8]) -> (XChaCha20, Poly1305) {
    let mut cipher = XChaCha20::new(key.into(), nonce.into());
    let mut mac_key = poly1305::Key::default();
    cipher.apply_keystream(&mut mac_key);
    let mut mac = Poly1305::new(&mac_key);
    mac_key.zeroize();
    cipher.seek(BLOCK);
    mac.update_padded(aad);
    (cipher, mac)
}

/// The last Poly1305 block: both lengths, little-endian.
fn lengths(aad: &[u8], body_len: usize) -> poly1305::Block {
    let mut block = poly1305::Block::default();
    block[..8].copy_from_slice(&(aad.len() as u64).to_le_bytes());
    block[8..].copy_from_slice(&(body_len as u64).to_le_bytes());
    block
}

/// MACs and hashes a body's ciphertext (without its tag) in chunks, so that each is read from
/// memory once for both. The chunks are multiples of Poly1305's block but the last, so this is
/// the MAC of the whole padded once.
fn mac_and_hash<'a>(mac: &mut Poly1305, hasher: &mut CtHasher, chunks: impl Iterator<Item = &'a [u8]>) {
    for chunk in chunks {
        mac.update_padded(chunk);
        hasher.update(chunk);
    }
}

/// Seals `plaintext`: returns the ciphertext with its tag appended, and the
/// [`ct_digest`](super::ct_digest) of both.
pub fn seal(key: &[u8; 32], nonce: &[u8; 24], aad: &[u8], plaintext: &[u8]) -> (Vec<u8>, [u8; 32]) {
    let (mut cipher, mut mac) = start(key, nonce, aad);
    if plaintext.len() < PARALLEL_MIN {
        // As the crate does it: copied, then encrypted in place.
        let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
        out.extend_from_slice(plaintext);
        cipher.apply_keystream(&mut out);
        mac.update_padded(&out);
        mac.update(&[lengths(aad, out.len())]);
        out.extend_from_slice(&mac.finalize());
        let digest = super::ct_digest(&out);
        return (out, digest);
    }
    let mut out = vec![0u8; plaintext.len() + TAG_LEN];
    let (body, tag_slot) = out.split_at_mut(plaintext.len());
    // This thread encrypts and publishes each chunk; the helper MACs and hashes the chunks as
    // they come (the two passes that read the ciphertext, 0.45 ms per MiB against the
    // keystream's 0.27), then writes the tag and hashes it too. It waits for the next chunk by
    // spinning, not by sleeping: waking a sleeping thread on an idle core took a VM exit per
    // chunk, which cost the encrypting thread as much as the work it moved away.
    let chunks: Vec<&mut [u8]> = body.chunks_mut(CHUNK).collect();
    let finished: Vec<OnceLock<&[u8]>> = chunks.iter().map(|_| OnceLock::new()).collect();
    let tag_and_digest = || {
        let mut hasher = CtHasher::new();
        mac_and_hash(&mut mac, &mut hasher, finished.iter().map(wait_for));
        mac.update(&[lengths(aad, plaintext.len())]);
        tag_slot.copy_from_slice(&mac.finalize());
        hasher.update(tag_slot);
        *hasher.finalize().as_bytes()
    };
    let encrypt_all = || {
        let _unblock = Unblock(&finished);
        for (from, (to, slot)) in plaintext.chunks(CHUNK).zip(chunks.into_iter().zip(&finished)) {
            cipher.try_apply_keystream_b2b(from, to).expect("the output is as long as the input");
            let _ = slot.set(to);
        }
    };
    let (digest, ()) = beside(tag_and_digest, encrypt_all);
    (out, digest)
}

/// The threads that take the second half of the work on large bodies: one fewer than the cores,
/// at least one (the calling thread is the other half). Long-lived, so that a wake-up puts one on
/// an idle core; a thread started per body ran on the busy core that started it. One on two
/// cores: with two, rayon's idle workers took turns yielding to each other on a core before they
/// slept, in the way of the work they were there to help.
fn helpers() -> &'static rayon::ThreadPool {
    HELPERS.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(helper_count())
            .thread_name(|_| "photon-bulk".into())
            .start_handler(|i| {
                if let Some(slot) = HELPER_TIDS.get(i) {
                    slot.store(cpu::thread_id().unwrap_or(0), Ordering::Relaxed);
                }
            })
            .build()
            .expect("threads can be started")
    })
}

static HELPERS: OnceLock<rayon::ThreadPool> = OnceLock::new();

/// The helpers whose kernel ids are kept (for [`steer_helpers`]); on machines with more cores
/// the others are left where Linux puts them.
const MAX_STEERED: usize = 8;

/// The kernel ids of the first helpers, 0 until a helper has started.
static HELPER_TIDS: [AtomicI32; MAX_STEERED] = [const { AtomicI32::new(0) }; MAX_STEERED];

/// The core every steered helper is kept off now, if one is: `None` until all of them were.
static KEPT_OFF: Mutex<Option<usize>> = Mutex::new(None);

/// Keeps the helpers off the core this thread runs on, so that a helper woken for this body
/// runs beside it, not in turns with it on one core while the other idles. A syscall per helper
/// when this thread's core is not the one they are kept off already; nothing otherwise. Another
/// body steering them at the same moment is not waited for: this one goes on as they are.
fn steer_helpers() {
    let Some(here) = cpu::current_cpu() else { return };
    let Ok(mut kept_off) = KEPT_OFF.try_lock() else { return };
    if *kept_off == Some(here) {
        return;
    }
    let to_steer = &HELPER_TIDS[..helper_count().min(MAX_STEERED)];
    let steered = to_steer
        .iter()
        .map(|tid| tid.load(Ordering::Relaxed))
        .filter(|&tid| tid != 0 && cpu::keep_off(tid, here))
        .count();
    *kept_off = (steered == to_steer.len()).then_some(here);
}

fn helper_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)))
}

/// Helpers in use. A body finds one free or does without: it never queues behind another
/// body's work.
static IN_USE: AtomicUsize = AtomicUsize::new(0);

struct Taken;

impl Taken {
    fn try_take() -> Option<Self> {
        IN_USE.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < helper_count()).then_some(n + 1)).ok()?;
        Some(Self)
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        IN_USE.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Should the encrypting thread unwind, publishes an empty chunk in every slot still empty, so
/// that the hasher finishes and the scope can end (and the panic go on).
struct Unblock<'s, 'a>(&'s [OnceLock<&'a [u8]>]);

impl Drop for Unblock<'_, '_> {
    fn drop(&mut self) {
        for slot in self.0 {
            let _ = slot.set(&[]);
        }
    }
}

/// The chunk `slot` will hold once it is published: spins briefly, then yields its core while
/// it waits (the encrypting thread may have been preempted).
fn wait_for<'a>(slot: &OnceLock<&'a [u8]>) -> &'a [u8] {
    let mut spins = 0u32;
    loop {
        if let Some(chunk) = slot.get() {
            return chunk;
        }
        if spins < SPINS {
            spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// Opens a ciphertext [`seal`] made (tag appended): the plaintext, or [`Refused`]. As the crate
/// does, on this thread: the tag is checked before anything is decrypted. (`e2e::open` opens a
/// large body on two threads instead: [`check_and_digest`] beside [`decrypt_unchecked`].)
pub fn open(key: &[u8; 32], nonce: &[u8; 24], aad: &[u8], ct: &[u8]) -> Result<Vec<u8>, Refused> {
    let (body, tag) = ct.split_at(ct.len().checked_sub(TAG_LEN).ok_or(Refused)?);
    let (mut cipher, mut mac) = start(key, nonce, aad);
    mac.update_padded(body);
    mac.update(&[lengths(aad, body.len())]);
    if mac.verify(poly1305::Block::from_slice(tag)).is_err() {
        return Err(Refused);
    }
    let mut out = body.to_vec();
    cipher.apply_keystream(&mut out);
    Ok(out)
}

/// Of a ciphertext [`seal`] made (tag appended): whether its tag verifies under `key`, and its
/// [`ct_digest`](super::ct_digest), from one pass over it. Decrypts nothing.
pub fn check_and_digest(key: &[u8; 32], nonce: &[u8; 24], aad: &[u8], ct: &[u8]) -> (bool, [u8; 32]) {
    let mut hasher = CtHasher::new();
    let Some(body_len) = ct.len().checked_sub(TAG_LEN) else {
        hasher.update(ct);
        return (false, *hasher.finalize().as_bytes());
    };
    let (body, tag) = ct.split_at(body_len);
    let (_, mut mac) = start(key, nonce, aad);
    mac_and_hash(&mut mac, &mut hasher, body.chunks(CHUNK));
    hasher.update(tag);
    mac.update(&[lengths(aad, body_len)]);
    (mac.verify(poly1305::Block::from_slice(tag)).is_ok(), *hasher.finalize().as_bytes())
}

/// The body of a ciphertext [`seal`] made (tag appended), decrypted **without checking its
/// tag**: only for running beside [`check_and_digest`], and to be dropped (which wipes it)
/// unless that found the tag good under the same key.
pub(crate) fn decrypt_unchecked(key: &[u8; 32], nonce: &[u8; 24], ct: &[u8]) -> zeroize::Zeroizing<Vec<u8>> {
    let body = &ct[..ct.len().saturating_sub(TAG_LEN)];
    let mut cipher = XChaCha20::new(key.into(), nonce.into());
    cipher.seek(BLOCK);
    let mut out = zeroize::Zeroizing::new(body.to_vec());
    cipher.apply_keystream(&mut out);
    out
}

/// Runs `on_helper` on a helper thread and `here` on this one, at the same time; returns both
/// results once both are done. When every helper is taken (other bodies are being sealed or
/// opened), both run here, `here` first: `on_helper` may wait for what `here` produces.
pub fn beside<A: Send, B>(on_helper: impl FnOnce() -> A + Send, here: impl FnOnce() -> B) -> (A, B) {
    let Some(_taken) = Taken::try_take() else {
        let b = here();
        return (on_helper(), b);
    };
    let pool = helpers();
    steer_helpers();
    let mut a = None;
    let b = pool.in_place_scope(|s| {
        s.spawn(|_| a = Some(on_helper()));
        here()
    });
    (a.expect("the scope ends after its jobs"), b)
}

/// The AEAD's decryption of a 32-byte message **without checking its tag**: the keystream
/// applied, nothing verified. Only for guessing a wrapped key to start work with while the
/// wrap is checked in full elsewhere; whatever is computed from the guess must be thrown away
/// unless that check passes and gives the same key.
pub fn unwrap_unchecked(key: &[u8; 32], nonce: &[u8; 24], wrapped: &[u8; 32]) -> zeroize::Zeroizing<[u8; 32]> {
    let mut cipher = XChaCha20::new(key.into(), nonce.into());
    cipher.seek(BLOCK);
    let mut guess = zeroize::Zeroizing::new(*wrapped);
    cipher.apply_keystream(&mut guess[..]);
    guess
}

#[cfg(test)]
mod tests {
    use chacha20poly1305::{
        aead::{Aead, Payload},
        XChaCha20Poly1305,
    };

    use super::*;

    const KEY: [u8; 32] = [7; 32];
    const NONCE: [u8; 24] = [9; 24];

    fn reference(aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let cipher: XChaCha20Poly1305 = chacha20poly1305::KeyInit::new(&KEY.into());
        cipher.encrypt(&NONCE.into(), Payload { msg: plaintext, aad }).unwrap()
    }

    fn body(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// Lengths around every boundary: Poly1305's block, ChaCha20's, the chunk, the threshold.
    const LENGTHS: [usize; 14] = [
        0,
        1,
        15,
        16,
        17,
        63,
        64,
        65,
        CHUNK - 1,
        CHUNK + 1,
        PARALLEL_MIN - 1,
        PARALLEL_MIN,
        PARALLEL_MIN + CHUNK + 5,
        (1 << 20) + 3,
    ];

    #[test]
    fn seals_as_the_crate_does_and_hashes_what_it_sealed() {
        let cipher: XChaCha20Poly1305 = chacha20poly1305::KeyInit::new(&KEY.into());
        for len in LENGTHS {
            let (plaintext, aad) = (body(len), b"header".as_slice());
            let (ct, digest) = seal(&KEY, &NONCE, aad, &plaintext);
            assert_eq!(ct, reference(aad, &plaintext), "length {len}");
            assert_eq!(digest, crate::crypto::ct_digest(&ct), "length {len}");
            let opened = cipher.decrypt(&NONCE.into(), Payload { msg: &ct, aad }).unwrap();
            assert_eq!(opened, plaintext, "length {len}");
        }
    }

    #[test]
    fn opens_what_the_crate_sealed() {
        for len in LENGTHS {
            let plaintext = body(len);
            let ct = reference(b"header", &plaintext);
            assert_eq!(open(&KEY, &NONCE, b"header", &ct).unwrap(), plaintext, "length {len}");
        }
    }

    /// What opening a large body runs on two threads: the tag's check with the digest, and the
    /// decryption, together what `open` does.
    #[test]
    fn checks_and_digests_in_one_pass_and_decrypts_apart() {
        for len in LENGTHS {
            let plaintext = body(len);
            let ct = reference(b"header", &plaintext);
            let digest = crate::crypto::ct_digest(&ct);
            assert_eq!(check_and_digest(&KEY, &NONCE, b"header", &ct), (true, digest), "length {len}");
            assert_eq!(*decrypt_unchecked(&KEY, &NONCE, &ct), plaintext, "length {len}");
        }
        let short = [0; TAG_LEN - 1];
        assert_eq!(check_and_digest(&KEY, &NONCE, b"", &short), (false, crate::crypto::ct_digest(&short)));
        assert!(decrypt_unchecked(&KEY, &NONCE, &short).is_empty());
    }

    #[test]
    fn unwrap_unchecked_is_the_decryption_without_the_tag() {
        let message = [5u8; 32];
        let wrapped = reference(b"bound", &message);
        let guess = unwrap_unchecked(&KEY, &NONCE, wrapped[..32].try_into().unwrap());
        assert_eq!(*guess, message);
        assert_eq!(open(&KEY, &NONCE, b"bound", &wrapped).unwrap(), message);
    }

    /// A body's half goes to a helper kept off the caller's core. Other tests hand the helpers
    /// work from other cores meanwhile, so it is enough that this is seen within a few tries.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_helpers_are_kept_off_the_callers_core() {
        use crate::ops::cpu::testing::{cores, may_run_on, pin};
        if cores() < 2 {
            return eprintln!("skipped: one core");
        }
        let me = cpu::thread_id().expect("Linux");
        let here = cpu::current_cpu().expect("Linux");
        pin(me, here);
        let kept_off = (0..200).any(|_| {
            let ((), ()) = beside(|| (), || ());
            let tid = HELPER_TIDS[0].load(Ordering::Relaxed);
            let off = tid != 0 && !may_run_on(tid, here);
            if !off {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            off
        });
        assert!(kept_off, "the helper may still run on core {here}");
    }

    /// More bodies at once than there are helpers: those that find none do without, and every
    /// one is sealed and hashed as the crate would.
    #[test]
    fn many_at_once() {
        std::thread::scope(|s| {
            for t in 0..6 {
                s.spawn(move || {
                    for len in [PARALLEL_MIN + t, PARALLEL_MIN + CHUNK * 3 + t] {
                        let plaintext = body(len);
                        let (ct, digest) = seal(&KEY, &NONCE, b"header", &plaintext);
                        assert_eq!(ct, reference(b"header", &plaintext), "length {len}");
                        assert_eq!(digest, crate::crypto::ct_digest(&ct), "length {len}");
                        let (checked, opened) = beside(
                            || check_and_digest(&KEY, &NONCE, b"header", &ct),
                            || decrypt_unchecked(&KEY, &NONCE, &ct),
                        );
                        assert_eq!(checked, (true, digest), "length {len}");
                        assert_eq!(*opened, plaintext, "length {len}");
                    }
                });
            }
        });
        assert_eq!(IN_USE.load(Ordering::Acquire), 0);
    }

    #[test]
    fn refuses_any_change() {
        for len in [100, PARALLEL_MIN + 5] {
            let ct = reference(b"header", &body(len));
            for at in [0, len / 2, len - 1, len, len + TAG_LEN - 1] {
                let mut bad = ct.clone();
                bad[at] ^= 1;
                assert_eq!(open(&KEY, &NONCE, b"header", &bad), Err(Refused), "length {len}, byte {at}");
                assert!(!check_and_digest(&KEY, &NONCE, b"header", &bad).0, "length {len}, byte {at}");
            }
            let cut = &ct[..ct.len() - 1];
            for (key, nonce, aad, ct, what) in [
                (&KEY, &NONCE, b"headex".as_slice(), ct.as_slice(), "other aad"),
                (&[8; 32], &NONCE, b"header", &ct, "other key"),
                (&KEY, &[8; 24], b"header", &ct, "other nonce"),
                (&KEY, &NONCE, b"header", cut, "cut"),
            ] {
                assert_eq!(open(key, nonce, aad, ct), Err(Refused), "length {len}: {what}");
                assert!(!check_and_digest(key, nonce, aad, ct).0, "length {len}: {what}");
            }
        }
        assert_eq!(open(&KEY, &NONCE, b"", &[0; TAG_LEN - 1]), Err(Refused));
    }
}
