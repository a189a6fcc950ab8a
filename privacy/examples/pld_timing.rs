//! Temporary timing harness.
use std::time::Instant;
fn main() {
    let args: Vec<f64> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (q, s, t, reps) = (args[0], args[1], args[2] as u64, args[3] as usize);
    let mut times = Vec::new();
    let mut e = 0.0;
    for _ in 0..reps {
        let start = Instant::now();
        e = privacy::dpsgd_epsilon_pld(q, s, t, 1e-5).unwrap();
        times.push(start.elapsed().as_secs_f64()*1e3);
    }
    times.sort_by(f64::total_cmp);
    println!("q={q} sigma={s} T={t}: eps={e} min {:.1} ms median {:.1} ms max {:.1} ms", times[0], times[reps/2], times[reps-1]);
}
