//! Speed of the distributed-DP noise shares and of the whole node-side encoding, one
//! core: `cargo run --release -p dpfl-common --example ddp_speed`.
//!
//! Per row: the time to draw 199,210 noise-share coordinates (the main job's model), and
//! the whole `encode` of a 199,210-parameter update (padded to 2^18 = 262,144: rotation,
//! clipping, conditional rounding and 262,144 share draws), median of 5 after a warm-up, as wall time and as on-CPU time of the thread (the
//! latter is what one core costs on a machine shared with other work).
//! The randomness is ChaCha20 seeded from the operating system, as in a deployment.

use dpfl_common::dp::distributed::{DistributedParams, Mechanism};
use dpfl_common::dp::encoding::DistributedEncoder;
use dpfl_common::dp::skellam::Skellam;
use dpfl_common::dp::DiscreteGaussianInt;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use std::time::Instant;

/// Nanoseconds this thread has run on a CPU (Linux `schedstat`), so that a loaded
/// machine's waiting is not counted; `None` elsewhere.
fn cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Median (wall seconds, on-CPU seconds) of 5 runs after a warm-up.
fn median(mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut wall = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..5 {
        let (s, c) = (Instant::now(), cpu_ns());
        f();
        wall.push(s.elapsed().as_secs_f64());
        cpu.push(match (c, cpu_ns()) {
            (Some(a), Some(b)) => (b - a) as f64 * 1e-9,
            _ => f64::NAN,
        });
    }
    wall.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    (wall[2], cpu[2])
}

fn main() {
    const DIM: usize = 199_210;
    let mut rng = ChaCha20Rng::from_entropy();
    let update: Vec<f32> = (0..DIM).map(|i| ((i % 7) as f32 - 3.0) * 1e-3).collect();
    println!("mechanism bits  n   share_sd  share_ms(199,210) wall/cpu  encode_ms(2^18) wall/cpu");
    for mechanism in [Mechanism::Skellam, Mechanism::Ddgauss] {
        for bits in [10u32, 12, 16, 20] {
            let n = 100;
            let p = DistributedParams {
                mechanism,
                bits,
                clip_norm: 1.0,
                noise_multiplier: 1.0,
                min_contributors: n,
                max_contributors: n,
                dim: DIM,
                beta: (-0.5f64).exp(),
                headroom: 3.0,
            };
            let var = p.share_variance().expect("valid parameters");
            let mut out = vec![0i64; DIM];
            let share_s = match mechanism {
                Mechanism::Skellam => {
                    let s = Skellam::new(var).expect("variance in range");
                    median(|| s.add_to(&mut out, &mut rng))
                }
                Mechanism::Ddgauss => {
                    let g = DiscreteGaussianInt::new(var.sqrt()).expect("scale in range");
                    median(|| out.iter_mut().for_each(|v| *v += g.sample(&mut rng)))
                }
            };
            let enc = DistributedEncoder::new(p, 1).expect("valid parameters");
            let encode_s = median(|| {
                std::hint::black_box(enc.encode(&update, &mut rng).expect("encodes"));
            });
            println!(
                "{mechanism:<9} {bits:>4} {n:>3} {:>9.1} {:>14.1} / {:>5.1} {:>14.1} / {:>5.1}",
                var.sqrt(),
                share_s.0 * 1e3,
                share_s.1 * 1e3,
                encode_s.0 * 1e3,
                encode_s.1 * 1e3
            );
        }
    }
}
