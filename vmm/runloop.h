/*
 * The vCPU run loop's interface (vmm/runloop.c), declared once for the C
 * compiler and, as is, for cffi (vmm/runloop_build.py reads this file's
 * declarations between the markers below): no preprocessor there but
 * plain #defines of integers.
 */
#ifndef LUVMM_RUNLOOP_H
#define LUVMM_RUNLOOP_H

#include <stdint.h>

/* CDEF-BEGIN */
#define LUVMM_MAX_TRAPS 16
#define LUVMM_EXIT_REASONS 64
#define LUVMM_WIRE_HEADER 20
/* luvmm_run() returned for a device access that failed (errno in ->error). */
#define LUVMM_EXIT_DEVICE_ERROR 0x10000
/* luvmm_serve(): the exit was served, the vCPU may run on. */
#define LUVMM_SERVED 0x20000

/* What a trapped guest-physical range is. */
#define LUVMM_TRAP_REGION 1
#define LUVMM_TRAP_PORTAL 2
#define LUVMM_TRAP_VMM 3
/* How a trap reaches the device. */
#define LUVMM_XPORT_PREADWRITE 1
#define LUVMM_XPORT_POSTED 2

struct luvmm_trap {
	uint64_t gpa;
	uint64_t size;
	uint64_t offset;	/* of the trap's first byte in the device fd */
	int32_t fd;
	uint32_t kind;
	uint32_t transport;
	uint32_t wire_op;	/* LUVMM_XPORT_POSTED: the request's op (luvmm/wire.py) */
	uint64_t reads;		/* accesses served by the loop */
	uint64_t writes;
};

/* A range of guest RAM, where this process maps it (MOVDIR64B reads its source there). */
struct luvmm_ram {
	uint64_t gpa;
	uint64_t size;
	uint8_t *hva;
};

struct luvmm_loop {
	int32_t vcpu_fd;
	int32_t irq_fd;		/* the device's interrupt eventfd, or -1 */
	void *run;		/* the vCPU's mmapped struct kvm_run */
	uint32_t wait_port;	/* an OUT here: wait for the interrupt (0: none) */
	uint32_t wait_ms;
	uint32_t ntraps;
	uint32_t portal_trap;	/* the trap the combining buffer belongs to */
	struct luvmm_trap traps[LUVMM_MAX_TRAPS];
	uint32_t nram;
	struct luvmm_ram ram[2];
	/* the write-combining buffer of this vCPU's portal stores */
	uint8_t portal[64];
	uint64_t portal_mask;	/* the bytes of it written so far */
	int64_t portal_line;	/* its offset in the portal trap, -1: empty */
	/* counters */
	uint64_t exits[LUVMM_EXIT_REASONS];	/* KVM_RUN returns, by exit reason */
	uint64_t handed;	/* of them, returned to the VMM */
	uint64_t portal_writes;	/* whole descriptors written */
	uint64_t movdir64b;	/* of them, by a MOVDIR64B that KVM could not emulate */
	uint64_t irq_waits;
	uint64_t interrupts;	/* interrupt eventfd counts read while waiting */
	uint64_t io_ignored;
	uint64_t serve_ns;	/* time spent here serving exits (not in KVM_RUN) */
	uint64_t max_serve_ns;	/* the longest of them */
	int32_t error;
};

int luvmm_run(struct luvmm_loop *l);
/* The exit in l->run, as luvmm_run() serves it after KVM_RUN: LUVMM_SERVED,
 * or what luvmm_run() returns for it.  For tests. */
int luvmm_serve(struct luvmm_loop *l);
/* MOVDIR64B r64, m512 (66 [REX] 0F 38 F8 /r): its destination and source
 * addresses and length, from the instruction bytes and the registers in
 * kvm_regs order; 0, or -1 if the bytes are not one. */
int luvmm_movdir64b_decode(const uint8_t *insn, uint32_t len, const uint64_t *kvm_regs, uint64_t *dest,
			   uint64_t *src, uint32_t *insn_len);
/* Guest-virtual to guest-physical through the 4-level page tables at cr3: 0 or -1. */
int luvmm_translate(struct luvmm_loop *l, uint64_t cr3, uint64_t gva, uint64_t *gpa);
uint64_t luvmm_rdtsc(void);
void luvmm_wire_header(uint8_t *out, uint32_t op, uint32_t length, uint64_t offset);
/* CDEF-END */

#endif
