//! Criterion bench of the linear sweep: decode throughput on real system binaries (the whole
//! ELF path: header parse + every executable section), reported in bytes of file per second.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hbt_coverage::sweep::Sweeper;

fn sweep(c: &mut Criterion) {
    let mut group = c.benchmark_group("sweep");
    for path in [
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/bin/bash",
        "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
    ] {
        let Ok(bytes) = std::fs::read(path) else {
            continue;
        };
        let mut sweeper = Sweeper::default();
        let code = match sweeper.sweep_elf(&bytes) {
            Ok(hbt_coverage::sweep::SweepOutcome::X86_64(s)) => s.code_bytes,
            _ => continue,
        };
        group.throughput(Throughput::Bytes(code));
        group.bench_function(path.rsplit('/').next().unwrap_or(path), |b| {
            b.iter(|| sweeper.sweep_elf(std::hint::black_box(&bytes)).is_ok())
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = sweep
}
criterion_main!(benches);
