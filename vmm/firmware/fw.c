/*
 * luvmm guest firmware: drives the passed-through device like a driver --
 * an Intel DSA, or (mailbox driver = DRIVER_EDU) the lab's QEMU edu, below --
 * at CPL 3, polling (no interrupts), with general-purpose registers only (the
 * VMM saves kvm_regs/kvm_sregs across a live update, not FPU state).
 *
 * vCPU 0: (if asked) reset and configure the DSA as the VFIO selftests'
 * driver does, then forever: keep `slots` batches in flight; each batch is
 * `pairs` x (MEMMOVE src -> dst, then a fenced COMPVAL of dst against the
 * batch's pattern with Check Result), so the device itself verifies every
 * copy; count successes, errors and verification failures in the mailbox and
 * bump the heartbeat.  Other vCPUs bump their own heartbeat.
 *
 * With no interrupt handler, the edu driver waits for its device's
 * interrupt by asking the VMM to (an OUT to LUVMM_PORT_WAIT_IRQ).
 *
 * Portal submissions are one MOVDIR64B where CPUID says the CPU has it (a
 * real DSA's portal takes nothing else), else eight 8-byte stores, which
 * the VMM combines into one 64-byte descriptor write (the portal traps).
 *
 * vCPU 0 keeps a record of its pace in guest RAM (the pace ring, mailbox.h):
 * what a real host, with no observer on its bus, measures the guest's
 * outage after a live update from.
 *
 * Restartable: everything the loop knows lives in guest RAM (the mailbox,
 * slot_seq[], the journal), and the counters of a submit or a reap change
 * together through a redo journal.  When a VMM dies and the next one starts
 * vCPU 0 at _start again on the same RAM and device (init_device = 0, state
 * still "running"), recover() finishes a committed journal entry, drains the
 * WQ -- after which every descriptor the device took has written its record
 * -- and takes back the slots whose batch never reached the device (the
 * VMM died while combining its portal stores).
 */
#include "mailbox.h"

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned char u8;

#define MB ((volatile struct mailbox *)MAILBOX_GPA)

/* drivers/dma/idxd/registers.h, include/uapi/linux/idxd.h */
#define IDXD_GENCAP_OFFSET 0x10
#define IDXD_WQCAP_OFFSET 0x20
#define IDXD_TABLE_OFFSET 0x60
#define IDXD_CMD_OFFSET 0xa0
#define IDXD_CMDSTS_OFFSET 0xa8
#define IDXD_CMDSTS_ACTIVE 0x80000000u
#define IDXD_CMD_ENABLE_DEVICE 1
#define IDXD_CMD_RESET_DEVICE 5
#define IDXD_CMD_ENABLE_WQ 6
#define DSA_OPCODE_BATCH 0x01
#define DSA_OPCODE_DRAIN 0x02
#define DSA_OPCODE_MEMMOVE 0x03
#define DSA_OPCODE_COMPVAL 0x06
#define IDXD_OP_FLAG_FENCE 0x0001
#define IDXD_OP_FLAG_CRAV 0x0004
#define IDXD_OP_FLAG_RCR 0x0008
#define IDXD_OP_FLAG_CR 0x0080
#define DSA_COMP_SUCCESS 1
#define DSA_COMP_SUCCESS_PRED 2

/* hw/misc/edu.c, docs/specs/edu.rst (devices/edu_regs.py) */
#define EDU_REG_ID 0x00
#define EDU_REG_ALIVE 0x04
#define EDU_REG_DMA_SRC 0x80
#define EDU_REG_DMA_DST 0x88
#define EDU_REG_DMA_COUNT 0x90
#define EDU_REG_DMA_CMD 0x98
#define EDU_REG_INTR_STATUS 0x24
#define EDU_REG_INTR_ACK 0x64
#define EDU_CMD_DMA_START 0x01
#define EDU_CMD_DMA_TO 0x00
#define EDU_CMD_DMA_FROM 0x02
#define EDU_CMD_DMA_IRQ 0x04
#define EDU_ID 0x010000edu /* version 0x100 << 16 | magic 0xed */
#define EDU_DMA_START 0x40000
#define EDU_DMA_MASK ((1ULL << 28) - 1)
#define EDU_ALIVE_PROBE 0x4c55564du

#define MAX_SLOTS 64
#define MAX_PAIRS 16

struct desc {
	u32 pasid_priv;
	u32 flags_opcode;
	u64 completion_addr;
	u64 src;
	u64 dst;
	u32 xfer_size;
	unsigned short int_handle;
	unsigned short rsvd1;
	u64 op[3];
};

struct record {
	volatile u8 status;
	u8 result;
	u8 fault_info;
	u8 rsvd;
	u32 bytes_completed;
	u64 fault_addr;
	u64 op[2];
};

static int movdir64b_ok;

static void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	*a = leaf;
	*c = 0;
	__asm__ volatile("cpuid" : "+a"(*a), "=b"(*b), "+c"(*c), "=d"(*d));
}

/* CPUID.(EAX=7,ECX=0):ECX[bit 28]: MOVDIR64B. */
static void detect_cpu(void)
{
	u32 a, b, c, d;

	cpuid(0, &a, &b, &c, &d);
	if (a >= 7) {
		cpuid(7, &a, &b, &c, &d);
		movdir64b_ok = (c >> 28) & 1;
	}
	MB->movdir64b = movdir64b_ok;
}

/* One descriptor to a portal: 64 bytes in one write, or eight stores the VMM combines. */
static void portal_write(u64 portal, const void *desc)
{
	const u64 *words = desc;
	u64 i;

	__asm__ volatile("" ::: "memory");
	if (movdir64b_ok) {
		__asm__ volatile("movdir64b (%1), %0" : : "r"(portal), "r"(desc) : "memory");
		return;
	}
	for (i = 0; i < 8; i++)
		((volatile u64 *)portal)[i] = words[i];
}

static u64 now_ns(void)
{
	u32 lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (u64)(((unsigned __int128)((u64)hi << 32 | lo) * MB->tsc_mult) >> 32);
}

/* The pace ring: (ns, heartbeat) every pace_period_ns (mailbox.h). */
static u64 pace_last;

static void pace(void)
{
	volatile struct pace_entry *e;
	u64 now;

	if (!MB->tsc_mult || !MB->pace_period_ns)
		return;
	now = now_ns();
	if (now - pace_last < MB->pace_period_ns)
		return;
	pace_last = now;
	e = (volatile struct pace_entry *)PACE_RING_GPA + MB->pace_head % PACE_RING_ENTRIES;
	e->ns = now;
	e->heartbeat = MB->heartbeat;
	__asm__ volatile("" ::: "memory");
	MB->pace_head++;
}

static inline u32 rd32(u64 addr) { return *(volatile u32 *)addr; }
static inline u64 rd64(u64 addr) { return *(volatile u64 *)addr; }
static inline void wr32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline void wr64(u64 addr, u64 v) { *(volatile u64 *)addr = v; }

/* The DMA area: batch records, member error records, descriptor lists, buffers. */
static u64 batch_record(u64 s) { return MB->dma_base + s * 32; }
static u64 member_record(u64 s, u64 i) { return MB->dma_base + 0x1000 + (s * 2 * MAX_PAIRS + i) * 32; }
static u64 desc_list(u64 s) { return MB->dma_base + 0x20000 + s * 2 * MAX_PAIRS * 64; }
static u64 buffer(u64 s, u64 p, u64 which)
{
	return MB->dma_base + 0x100000 + ((s * MAX_PAIRS + p) * 2 + which) * MB->xfer;
}

static u64 drain_record(void) { return MB->dma_base + 0xc00; } /* between the batch and member records */
static u64 slot_seq[MAX_SLOTS];
static u64 next_seq = 1;

/* The redo journal: a submit or a reap writes the new counters and slot here,
 * commits, applies, and clears the commit.  Applying twice is harmless. */
static struct {
	u64 valid, slot, seq;
	u64 submitted, completed, inflight, descs_ok, errors, verify_failures, last_error;
} journal;

static void begin(u64 slot, u64 seq)
{
	journal.slot = slot;
	journal.seq = seq;
	journal.submitted = MB->submitted;
	journal.completed = MB->completed;
	journal.inflight = MB->inflight;
	journal.descs_ok = MB->descs_ok;
	journal.errors = MB->errors;
	journal.verify_failures = MB->verify_failures;
	journal.last_error = MB->last_error;
}

static void apply(void)
{
	MB->submitted = journal.submitted;
	MB->completed = journal.completed;
	MB->inflight = journal.inflight;
	MB->descs_ok = journal.descs_ok;
	MB->errors = journal.errors;
	MB->verify_failures = journal.verify_failures;
	MB->last_error = journal.last_error;
	slot_seq[journal.slot] = journal.seq;
}

static void commit(void)
{
	__asm__ volatile("" ::: "memory");
	*(volatile u64 *)&journal.valid = 1;
	__asm__ volatile("" ::: "memory");
	apply();
	__asm__ volatile("" ::: "memory");
	*(volatile u64 *)&journal.valid = 0;
}

static u64 pattern(u64 seq) { return 0x9e3779b97f4a7c15ULL * seq ^ 0x4c55564d4dULL; }

static int command(u32 cmd, u32 operand)
{
	u64 bar0 = MB->bar0;
	u32 sts;

	wr32(bar0 + IDXD_CMD_OFFSET, (operand & 0xfffff) | (cmd & 0x1f) << 20);
	do
		sts = rd32(bar0 + IDXD_CMDSTS_OFFSET);
	while (sts & IDXD_CMDSTS_ACTIVE);
	if (sts & 0xff) {
		MB->init_error = (u64)cmd << 8 | (sts & 0xff);
		return -1;
	}
	return 0;
}

static int init_device(void)
{
	u64 bar0 = MB->bar0, gencap, wqcap, offsets, wqcfg, grpcfg;
	u32 max_xfer_shift, max_batch_shift;

	if (command(IDXD_CMD_RESET_DEVICE, 0))
		return -1;
	gencap = rd64(bar0 + IDXD_GENCAP_OFFSET);
	wqcap = rd64(bar0 + IDXD_WQCAP_OFFSET);
	offsets = rd64(bar0 + IDXD_TABLE_OFFSET);
	grpcfg = bar0 + (offsets & 0xffff) * 0x100;
	wqcfg = bar0 + ((offsets >> 16) & 0xffff) * 0x100;
	max_xfer_shift = (gencap >> 16) & 0x1f;
	max_batch_shift = (gencap >> 21) & 0xf;
	wr32(wqcfg + 0, wqcap & 0xffff);		/* wq_size = total_wq_size */
	wr32(wqcfg + 8, 1 | 1 << 4);			/* dedicated, priority 1 */
	wr32(wqcfg + 12, max_xfer_shift | max_batch_shift << 5);
	wr64(grpcfg + 0, 1);				/* group 0: WQ 0 */
	wr64(grpcfg + 32, 1);				/* group 0: engine 0 */
	if (command(IDXD_CMD_ENABLE_DEVICE, 0))
		return -1;
	return command(IDXD_CMD_ENABLE_WQ, 0);
}

static void put_desc(u64 at, u32 opcode, u32 flags, u64 record, u64 src, u64 dst, u32 size, u64 op0)
{
	volatile struct desc *d = (volatile struct desc *)at;

	d->pasid_priv = 0;
	d->flags_opcode = flags | opcode << 24;
	d->completion_addr = record;
	d->src = src;
	d->dst = dst;
	d->xfer_size = size;
	d->int_handle = 0;
	d->rsvd1 = 0;
	d->op[0] = op0;
	d->op[1] = 0;
	d->op[2] = 0;
}

static void submit(u64 s)
{
	u64 seq = next_seq++, pairs = MB->pairs, xfer = MB->xfer, pat = pattern(seq), p, i;
	u64 list = desc_list(s);
	struct desc batch;

	for (p = 0; p < pairs; p++) {
		u64 *src = (u64 *)buffer(s, p, 0);

		for (i = 0; i < xfer / 8; i++)
			src[i] = pat;
		((volatile u64 *)buffer(s, p, 1))[0] = ~pat; /* the copy must overwrite this */
		put_desc(list + (2 * p) * 64, DSA_OPCODE_MEMMOVE, IDXD_OP_FLAG_CRAV, member_record(s, 2 * p),
			 buffer(s, p, 0), buffer(s, p, 1), xfer, 0);
		put_desc(list + (2 * p + 1) * 64, DSA_OPCODE_COMPVAL,
			 IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_FENCE | IDXD_OP_FLAG_CR, member_record(s, 2 * p + 1),
			 buffer(s, p, 1), pat, xfer, 0 /* expected_res: equal */);
	}
	for (i = 0; i < 2 * pairs; i++)
		((struct record *)member_record(s, i))->status = 0;
	((struct record *)batch_record(s))->status = 0;
	put_desc((u64)&batch, DSA_OPCODE_BATCH, IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_RCR, batch_record(s), list, 0,
		 2 * pairs, 0);
	begin(s, seq);
	journal.submitted++;
	journal.inflight++;
	commit();
	portal_write(MB->bar2, &batch);
}

static void reap(u64 s)
{
	volatile struct record *r = (volatile struct record *)batch_record(s);
	u64 pairs = MB->pairs, i;
	u8 status = r->status;

	begin(s, 0);
	if (status == DSA_COMP_SUCCESS) {
		journal.descs_ok += 2 * pairs;
	} else {
		journal.errors++;
		journal.last_error = status;
		for (i = 0; i < pairs; i++)
			if (((struct record *)member_record(s, 2 * i + 1))->status == DSA_COMP_SUCCESS_PRED)
				journal.verify_failures++;
	}
	journal.completed++;
	journal.inflight--;
	commit();
}

static void recover(void)
{
	volatile struct record *drained = (volatile struct record *)drain_record();
	struct desc drain;
	u64 s;

	if (journal.valid) {
		apply();
		journal.valid = 0;
	}
	drained->status = 0;
	put_desc((u64)&drain, DSA_OPCODE_DRAIN, IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_RCR, drain_record(), 0, 0, 0, 0);
	portal_write(MB->bar2, &drain);
	while (!drained->status)
		;
	for (s = 0; s < MAX_SLOTS; s++) {
		if (slot_seq[s] && !((volatile struct record *)batch_record(s))->status) {
			begin(s, 0);
			journal.submitted--;
			journal.inflight--;
			commit();
		}
	}
	MB->recoveries++;
}

/*
 * QEMU's edu: one transfer at a time, polled.  A transfer moves a pattern
 * from a source buffer into the device's buffer and back into a destination
 * buffer, and the firmware compares the two: a "batch" of the mailbox's
 * counters, two descriptors' worth.  Its record (struct edu_record) says what
 * is in flight and holds the stamps of the heartbeat and of each completion,
 * taken from the TSC (the VMM keeps the guest's TSC on the host's, across a
 * live update too) -- the gaps a real host measures with no observer on its
 * bus.  When the device came back reset (the kernel could not preserve it)
 * the VMM bumps device_resets before the vCPUs run again: the transfer under
 * way is lost with the device's state and is done again from its start, as a
 * PCI driver's reset_done handler would -- counted in redone, never as
 * corrupted.
 */
#define EDU ((volatile struct edu_record *)MB->dma_base)

static u64 edu_next_seq = 1;

static void stamp(volatile unsigned long long *last, volatile unsigned long long *max)
{
	u64 now;

	if (!MB->tsc_mult)
		return;
	now = now_ns();
	if (*last && now > *last && now - *last > *max)
		*max = now - *last;
	*last = now;
}

static void edu_beat(void)
{
	stamp(&EDU->last_heartbeat_ns, &EDU->max_heartbeat_gap_ns);
	MB->heartbeat++;
	pace();
}

static void wait_irq(void)
{
	__asm__ volatile("outb %%al, %%dx" : : "a"(0), "d"((unsigned short)LUVMM_PORT_WAIT_IRQ) : "memory");
}

/* One DMA, to its end (its interrupt, then the run bit); 0 if the device was reset meanwhile. */
static int edu_dma(u64 src, u64 dst, u32 direction, u64 epoch)
{
	u64 bar0 = MB->bar0;
	u32 status;

	wr64(bar0 + EDU_REG_DMA_SRC, src);
	wr64(bar0 + EDU_REG_DMA_DST, dst);
	wr64(bar0 + EDU_REG_DMA_COUNT, EDU_XFER);
	wr64(bar0 + EDU_REG_DMA_CMD, EDU_CMD_DMA_START | EDU_CMD_DMA_IRQ | direction);
	while (rd32(bar0 + EDU_REG_DMA_CMD) & EDU_CMD_DMA_START) {
		if (MB->device_resets != epoch)
			return 0;
		edu_beat();
		wait_irq();
	}
	status = rd32(bar0 + EDU_REG_INTR_STATUS);
	if (status)
		wr32(bar0 + EDU_REG_INTR_ACK, status);
	return MB->device_resets == epoch;
}

static int edu_init(void)
{
	u64 bar0 = MB->bar0;
	u32 id = rd32(bar0 + EDU_REG_ID);

	if (id != EDU_ID) {
		MB->init_error = id;
		return -1;
	}
	wr32(bar0 + EDU_REG_ALIVE, EDU_ALIVE_PROBE);
	if (rd32(bar0 + EDU_REG_ALIVE) != ~EDU_ALIVE_PROBE) {
		MB->init_error = 0xa11e;
		return -1;
	}
	return 0;
}

static void edu_main(void)
{
	u64 base = MB->dma_base, src = base + EDU_SRC_OFFSET, dst = base + EDU_DST_OFFSET;
	volatile u64 *s = (volatile u64 *)src, *d = (volatile u64 *)dst;
	u64 seq, pat, epoch, i, ok;

	if (MB->state == 2 && !MB->init_device) {
		/* A new VMM restarted us on the RAM and device we had: the
		 * transfer under way (if any) is done again; the counters agree
		 * with it whatever instruction the last VMM stopped us at. */
		MB->inflight = EDU->seq_in_flight ? 1 : 0;
		MB->submitted = MB->completed + MB->inflight;
		MB->recoveries++;
	}
	MB->state = 1;
	if (edu_init()) {
		MB->state = 3;
		for (;;)
			MB->heartbeat++;
	}
	MB->state = 2;
	for (;;) {
		epoch = MB->device_resets;
		if (!EDU->seq_in_flight) {
			MB->submitted++;
			MB->inflight++;
			EDU->seq_in_flight = edu_next_seq++;
		}
		seq = EDU->seq_in_flight;
		pat = pattern(seq);
		EDU->phase = EDU_TO_DEVICE;
		for (i = 0; i < EDU_XFER / 8; i++) {
			s[i] = pat;
			d[i] = ~pat; /* the copy back must overwrite this */
		}
		if (!edu_dma(src & EDU_DMA_MASK, EDU_DMA_START, EDU_CMD_DMA_TO, epoch))
			goto redo;
		EDU->phase = EDU_FROM_DEVICE;
		if (!edu_dma(EDU_DMA_START, dst & EDU_DMA_MASK, EDU_CMD_DMA_FROM, epoch))
			goto redo;
		for (ok = 1, i = 0; i < EDU_XFER / 8; i++)
			if (d[i] != pat)
				ok = 0;
		if (ok) {
			MB->descs_ok += 2; /* the two DMAs, to the device and back */
		} else {
			MB->errors++;
			MB->verify_failures++;
			MB->last_error = seq;
		}
		EDU->phase = EDU_IDLE;
		EDU->seq_in_flight = 0;
		MB->completed++;
		MB->inflight--;
		stamp(&EDU->last_completion_ns, &EDU->max_completion_gap_ns);
		edu_beat();
		continue;
redo:
		EDU->redone++;
		EDU->phase = EDU_IDLE;
	}
}

void main0(void)
{
	u64 s, slots;

	detect_cpu();
	if (MB->driver == DRIVER_EDU)
		edu_main();

	if (MB->state == 2 && !MB->init_device)
		recover(); /* a new VMM restarted us on the RAM and device we had */
	MB->state = 1;
	if (MB->init_device && init_device()) {
		MB->state = 3;
		for (;;)
			MB->heartbeat++;
	}
	MB->state = 2;
	slots = MB->slots > MAX_SLOTS ? MAX_SLOTS : MB->slots;
	for (;;) {
		for (s = 0; s < slots; s++) {
			if (slot_seq[s] == 0)
				submit(s);
			else if (((volatile struct record *)batch_record(s))->status)
				reap(s);
		}
		MB->heartbeat++;
		pace();
	}
}

void aux(u64 id)
{
	for (;;)
		MB->aux_heartbeat[id & 15]++;
}

/* Entry: the VMM sets RSP and RDI (vCPU id) and RIP = _start. */
__asm__(".pushsection .text._start, \"ax\"\n"
	".globl _start\n"
	"_start:\n"
	"	test %rdi, %rdi\n"
	"	jnz 1f\n"
	"	call main0\n"
	"1:	call aux\n"
	"2:	jmp 2b\n"
	".popsection\n");
