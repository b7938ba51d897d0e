// Hybrid-engine coherence probe (kvm_pvm; src/vmm/engine/hybrid/user_tables.rs rests on it):
// which page-table changes made through the VMM's mapping does KVM's shadow MMU see, and what
// do the hybrid engine's round trips cost? CPL3 code runs on tables in a separate "reserved"
// slot with a VMM-owned GDT/IDT/TSS and `out` stubs, as the engine's. A: not-present ->
// present in place. C: a fresh root over fresh frames. E: a recycled frame (shadowed before)
// with new content, then after toggling only the reserved slot. F: read-only -> writable in
// place. G: present -> not-present in place. D: round-trip costs (a #GP exit, a fresh tree, a
// reserved-slot toggle); S: a CPL3 `syscall` (kvm_pvm: #PF at the LSTAR stub) and its round
// trip; P: a #PF round trip and its frame.
//   gcc -O2 -o hybrid_coherence scripts/probes/hybrid_coherence.c && ./hybrid_coherence
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>

#define MSZ (256UL << 20)
#define RSV 0x40000000UL  // reserved slot GPA
#define RSZ (1UL << 20)
static int kvm, vm, vcpu;
static uint8_t *mem, *rsv;
static struct kvm_run *run;
static struct kvm_sregs us;
static struct kvm_regs ur;
#define VA 0x20000UL
#define FA 0x30000UL
#define FB 0x31000UL
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
static void slot(int id, uint64_t gpa, uint64_t size, void *host, int on) {
  struct kvm_userspace_memory_region r = {id, 0, gpa, on ? size : 0, (uint64_t)host};
  if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0) perror("region");
}
static uint32_t step(int *port) {
  if (ioctl(vcpu, KVM_RUN, 0) < 0) { perror("run"); exit(1); }
  if (run->exit_reason == KVM_EXIT_IO) { *port = run->io.port; return *(uint32_t *)((uint8_t *)run + run->io.data_offset); }
  struct kvm_regs r; ioctl(vcpu, KVM_GET_REGS, &r);
  printf("unexpected exit %d at rip %llx\n", run->exit_reason, r.rip); exit(1);
}
static void to_user(void) { ioctl(vcpu, KVM_SET_SREGS, &us); ioctl(vcpu, KVM_SET_REGS, &ur); }
static uint64_t *T(uint64_t gpa) { return gpa >= RSV ? (uint64_t *)(rsv + gpa - RSV) : (uint64_t *)(mem + gpa); }
// builds a 4-level tree in reserved frames starting at `at`: identity 2M user, VA -> frame (or np)
static uint64_t build(uint64_t at, uint64_t frame) {
  uint64_t pml4 = at, pdpt = at + 0x1000, pd = at + 0x2000, pt = at + 0x3000;
  memset(T(pml4), 0, 0x4000);
  T(pml4)[0] = pdpt | 7; T(pdpt)[0] = pd | 7; T(pd)[0] = pt | 7;
  for (uint64_t i = 0; i < 512; i++) T(pt)[i] = (i << 12) | 7;
  T(pt)[VA >> 12] = frame ? frame | 7 : 0;
  T(pd)[1] = 0x200000 | 0x87;
  // hbt region: map RSV 1:1 at VA 0x8000000000 (pml4 slot 1) supervisor
  uint64_t pdpt2 = at + 0x4000, pd2 = at + 0x5000; memset(T(pdpt2), 0, 0x2000);
  T(pml4)[1] = pdpt2 | 3; T(pdpt2)[0] = pd2 | 3; T(pd2)[0] = RSV | 0x83;  // 2M page supervisor
  return pml4;
}
int main(void) {
  kvm = open("/dev/kvm", O_RDWR); vm = ioctl(kvm, KVM_CREATE_VM, 0);
  mem = mmap(0, MSZ, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  rsv = mmap(0, RSZ, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  memset(mem + FA, 0xaa, 4096); memset(mem + FB, 0xbb, 4096);
  // user loop at 0x1000: mov eax,[VA]; out 0xf0,eax; jmp
  uint8_t code[] = {0x8b, 0x04, 0x25, VA & 0xff, (VA >> 8) & 0xff, (VA >> 16) & 0xff, 0, 0x66, 0xba, 0xf0, 0x00, 0xef, 0xeb, 0xf2};
  memcpy(mem + 0x1000, code, sizeof code);
  // syscall loop at 0x1100: syscall; jmp
  uint8_t sc[] = {0x0f, 0x05, 0xeb, 0xfc};
  memcpy(mem + 0x1100, sc, sizeof sc);
  // reserved region: GDT at +0, IDT at +0x1000, TSS at +0x2000, stubs at +0x3000, stack top +0x8000
  uint64_t *gdt = (uint64_t *)rsv;
  gdt[1] = 0x00af9b000000ffffULL; gdt[2] = 0x00cf93000000ffffULL; gdt[3] = 0x00cff3000000ffffULL; gdt[4] = 0x00affb000000ffffULL;
  uint64_t HV = 0x8000000000UL;  // VA of RSV
  uint64_t tb = HV + 0x2000; gdt[5] = 103 | ((tb & 0xffffff) << 16) | (0x89ULL << 40) | (((tb >> 24) & 0xff) << 56); gdt[6] = tb >> 32;
  uint8_t *tss = rsv + 0x2000; *(uint64_t *)(tss + 4) = HV + 0x8000; *(uint16_t *)(tss + 102) = 104;
  // stub for vector v at +0x3000 + v*16: mov al, v; out 0xf2, al; hlt
  for (int v = 0; v < 256; v++) {
    uint8_t *s = rsv + 0x3000 + v * 16; s[0] = 0xe7; s[1] = v; s[2] = 0xf4;
    uint64_t h = HV + 0x3000 + v * 16; uint64_t *g = (uint64_t *)(rsv + 0x1000 + v * 16);
    g[0] = (h & 0xffff) | (0x8ULL << 16) | (0x8eULL << 40) | (((h >> 16) & 0xffff) << 48); g[1] = h >> 32;
  }
  // syscall stub at +0x4000: out 0xf3, al; hlt
  uint8_t *ss = rsv + 0x4000; ss[0] = 0x66; ss[1] = 0xba; ss[2] = 0xf3; ss[3] = 0x01; ss[4] = 0xef; ss[5] = 0xf4;
  slot(0, 0, MSZ, mem, 1); slot(1, RSV, RSZ, rsv, 1);
  vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
  run = mmap(0, ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
  ioctl(vcpu, KVM_GET_SREGS, &us);
  struct kvm_segment cs3 = {.base = 0, .limit = 0xffffffff, .selector = 0x23, .type = 11, .present = 1, .dpl = 3, .s = 1, .l = 1, .g = 1};
  struct kvm_segment ds3 = {.base = 0, .limit = 0xffffffff, .selector = 0x1b, .type = 3, .present = 1, .dpl = 3, .db = 1, .s = 1, .g = 1};
  struct kvm_segment tr = {.base = HV + 0x2000, .limit = 103, .selector = 0x28, .type = 11, .present = 1, .s = 0};
  us.cs = cs3; us.ds = us.es = us.fs = us.gs = us.ss = ds3; us.tr = tr;
  us.gdt.base = HV; us.gdt.limit = 0x3f; us.idt.base = HV + 0x1000; us.idt.limit = 0xfff;
  us.cr4 = 0x20; us.cr0 = 0x80050033; us.efer = 0x501;
  uint64_t next = RSV + 0x10000;
  us.cr3 = build(next, getenv("PRESENT") ? FA : 0); next += 0x6000;
  memset(&ur, 0, sizeof ur); ur.rip = 0x1000; ur.rflags = 0x202; ur.rsp = 0x3ff000;
  struct kvm_msrs *m = calloc(1, sizeof *m + 3 * sizeof(struct kvm_msr_entry)); m->nmsrs = 3;
  m->entries[0].index = 0xc0000081; m->entries[0].data = (0x13ULL << 48) | (0x8ULL << 32);
  m->entries[1].index = 0xc0000082; m->entries[1].data = HV + 0x4000;
  m->entries[2].index = 0xc0000084; m->entries[2].data = 0x47700;
  ioctl(vcpu, KVM_SET_MSRS, m);
  to_user();
  int port; uint32_t v = step(&port);
  printf("A0: VA not present: port %#x value %#x (want port 14 = #PF)\n", port, v & 0xff);
  struct kvm_sregs ks; ioctl(vcpu, KVM_GET_SREGS, &ks);
  printf("    cr2 %#llx\n", ks.cr2);
  T(us.cr3 + 0x3000)[VA >> 12] = FA | 7;  // in place np -> present
  to_user(); v = step(&port);
  printf("A1: np->present in place: port %#x read %#x (want 0xaaaaaaaa)\n", port, v);
  // C: fresh root over fresh frames, VA -> FB
  us.cr3 = build(next, FB); next += 0x6000; to_user(); v = step(&port);
  printf("C1: fresh tree VA->B: %#x (want 0xbbbbbbbb)\n", v);
  us.cr3 = build(next, FA); next += 0x6000; to_user(); v = step(&port);
  printf("C2: fresh tree VA->A: %#x (want 0xaaaaaaaa)\n", v);
  // E: reuse the first tree's frames (shadowed) with VA -> B
  us.cr3 = build(RSV + 0x10000, FB); to_user(); v = step(&port);
  printf("E1: recycled frames VA->B without reset: %#x (fresh 0xbbbbbbbb)\n", v);
  slot(1, RSV, RSZ, rsv, 0); slot(1, RSV, RSZ, rsv, 1);
  to_user(); v = step(&port);
  printf("E2: after toggling the reserved slot only: %#x (fresh 0xbbbbbbbb)\n", v);
  // F: RO -> RW upgrade in place. user code at 0x1200: mov dword [VA], 0x12345678; mov eax,[VA]; out 0xf0 (-> #GP 13)
  uint8_t wr[] = {0xc7, 0x04, 0x25, VA & 0xff, (VA >> 8) & 0xff, (VA >> 16) & 0xff, 0, 0x78, 0x56, 0x34, 0x12,
                  0x8b, 0x04, 0x25, VA & 0xff, (VA >> 8) & 0xff, (VA >> 16) & 0xff, 0, 0x66, 0xba, 0xf0, 0x00, 0xef};
  memcpy(mem + 0x1200, wr, sizeof wr);
  us.cr3 = build(next, FA); next += 0x6000; T(us.cr3 + 0x3000)[VA >> 12] = FA | 5;  // RO user
  ur.rip = 0x1200; to_user(); v = step(&port);
  ioctl(vcpu, KVM_GET_SREGS, &ks);
  printf("F0: write to RO: port %d cr2 %#llx\n", port, ks.cr2);
  T(us.cr3 + 0x3000)[VA >> 12] = FA | 7;  // upgrade in place
  to_user(); v = step(&port);
  printf("F1: after RO->RW in place: port %d value %#x (want 13, 0x12345678)\n", port, v);
  // G: present -> np in place (downgrade): expect stale
  T(us.cr3 + 0x3000)[VA >> 12] = 0; ur.rip = 0x1000; to_user(); v = step(&port);
  printf("G: present->np in place: port %d (fresh would be 14)\n", port);
  ur.rip = 0x1000;
  memset(mem + FA, 0xaa, 4096);  // F wrote into frame A
  // D: costs (steady state loop)
  int n = 2000; double t0 = now();
  for (int i = 0; i < n; i++) { to_user(); step(&port); }
  double base = (now() - t0) / n;
  t0 = now();
  for (int i = 0; i < n; i++) { to_user(); step(&port); }
  double withset = (now() - t0) / n;
  t0 = now();
  for (int i = 0; i < n; i++) { us.cr3 = build(next, i & 1 ? FA : FB); next += 0x6000; if (next + 0x6000 > RSV + RSZ) { next = RSV + 0x10000; slot(1, RSV, RSZ, rsv, 0); slot(1, RSV, RSZ, rsv, 1);} to_user(); if (step(&port) != (i & 1 ? 0xaaaaaaaau : 0xbbbbbbbbu)) printf("stale at %d\n", i); }
  double fresh = (now() - t0) / n;
  t0 = now();
  for (int i = 0; i < n; i++) { slot(1, RSV, RSZ, rsv, 0); slot(1, RSV, RSZ, rsv, 1); to_user(); step(&port); }
  double rtoggle = (now() - t0) / n;
  printf("D: CPL3 #GP round trip (SET_REGS only) %.1f us; +SET_SREGS %.1f; fresh tree each %.1f; reserved-slot toggle each %.1f\n", base, withset, fresh, rtoggle);
  // touch 64 MiB of RAM under KVM? (working-set effect on RAM slot toggle) skipped
  // syscall round trip: rip 0x1100 -> LSTAR stub out 0xf3
  ur.rip = 0x1100; to_user(); v = step(&port);
  struct kvm_regs r; ioctl(vcpu, KVM_GET_REGS, &r); ioctl(vcpu, KVM_GET_SREGS, &ks);
  printf("S: syscall -> port %#x rip %#llx rcx %#llx r11 %#llx cs %#x cpl(ss.dpl) %d\n", port, r.rip, r.rcx, r.r11, ks.cs.selector, ks.ss.dpl);
  t0 = now();
  for (int i = 0; i < n; i++) { to_user(); step(&port); }
  printf("S: syscall round trip %.1f us\n", (now() - t0) / n);
  // #PF round trip
  T(us.cr3 + 0x3000)[VA >> 12] = 0; us.cr3 = build(next, 0); next += 0x6000; ur.rip = 0x1000;
  t0 = now();
  for (int i = 0; i < n; i++) { to_user(); step(&port); if (port != 14) printf("no pf\n"); }
  printf("P: #PF round trip %.1f us\n", (now() - t0) / n);
  ioctl(vcpu, KVM_GET_REGS, &r);
  uint64_t *fr = (uint64_t *)(rsv + 0x8000 - 48);
  printf("P: frame err %#lx rip %#lx cs %#lx rfl %#lx rsp %#lx ss %#lx\n", fr[0], fr[1], fr[2], fr[3], fr[4], fr[5]);
  return 0;
}
