/*
 * The vCPU run loop, in C: KVM_RUN and the exits of the steady state,
 * served without the VMM's Python (and so without its GIL).
 *
 * A guest's path to its passed-through device must not run through the
 * interpreter: an MMIO exit served in Python waits for the GIL, which the
 * control plane holds while it imports trio after a restore or answers a
 * Prometheus scrape, and the guest crawls.  So the VMM maps the BAR areas
 * VFIO lets it map into the guest (KVM memory slots: no exit at all), and
 * this loop serves what still traps:
 *
 *   LUVMM_TRAP_REGION  a BAR area without mmap: the access goes to the VFIO
 *                      region at its offset -- pread/pwrite(2) on the device
 *                      fd, or, on the emulated host, a posted write on the
 *                      device's file socket (luvmm/wire.py; reads return to
 *                      the VMM, which holds that socket's request lock);
 *   LUVMM_TRAP_PORTAL  a DSA portal: the guest's stores of one descriptor are
 *                      combined into the single 64-byte write MOVDIR64B makes
 *                      on real hardware (a CPU without it stores eight
 *                      quadwords), and only a whole descriptor reaches the
 *                      device;
 *   LUVMM_TRAP_VMM     the MSI-X table, which the VMM virtualises: returned;
 *
 * the firmware's wait-for-interrupt port (an OUT to wait_port): a bounded
 * poll(2) of the device's interrupt eventfd; and a MOVDIR64B to a trapped
 * portal, which KVM's instruction emulator cannot do (it exits with
 * KVM_INTERNAL_ERROR_EMULATION and, with KVM_CAP_EXIT_ON_EMULATION_FAILURE,
 * the instruction bytes): decoded here, its 64-byte source read through
 * the guest's page tables, written whole, RIP stepped past it.  Other port
 * I/O is ignored (IN reads all ones), as with no device behind the port.
 *
 * luvmm_run() returns only for what the VMM must decide: a kick
 * (KVM_EXIT_INTR: the pause and stop protocol of vmm/vcpus.py), an exit it
 * does not serve here (KVM_EXIT_MMIO outside every trap or to a VMM trap,
 * HLT, SHUTDOWN, an emulation failure such as MOVDIR64B to a trapped
 * portal...), a failed KVM_RUN (-errno) or a device access that failed
 * (LUVMM_EXIT_DEVICE_ERROR, errno in ->error).  Counters are per vCPU, in
 * the loop, read by the VMM at any time (vm status: exits by reason).
 *
 * No allocation, no lock: a loop belongs to its vCPU's thread; the VMM
 * writes its configuration before the thread runs and reads counters that
 * are naturally aligned 64-bit words.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "runloop.h"

/* luvmm/wire.py REQUEST: <B op, 3 pad, I arg, Q arg64, I tag> (little endian). */
void luvmm_wire_header(uint8_t *out, uint32_t op, uint32_t length, uint64_t offset)
{
	uint32_t tag = 0; /* a posted write has no reply to match */

	out[0] = (uint8_t)op;
	out[1] = out[2] = out[3] = 0;
	memcpy(out + 4, &length, 4);
	memcpy(out + 8, &offset, 8);
	memcpy(out + 16, &tag, 4);
}

static int device_write(struct luvmm_trap *t, uint64_t off, const void *data, uint32_t len)
{
	ssize_t n;

	if (t->transport == LUVMM_XPORT_POSTED) {
		uint8_t msg[LUVMM_WIRE_HEADER + 64];

		if (len > 64)
			return -EINVAL;
		luvmm_wire_header(msg, t->wire_op, len, t->offset + off);
		memcpy(msg + LUVMM_WIRE_HEADER, data, len);
		/* SOCK_SEQPACKET: a message goes whole or not at all; EINTR sent nothing. */
		do
			n = send(t->fd, msg, LUVMM_WIRE_HEADER + len, MSG_NOSIGNAL);
		while (n < 0 && errno == EINTR);
		return n < 0 ? -errno : 0;
	}
	do
		n = pwrite(t->fd, data, len, (off_t)(t->offset + off));
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	return (uint32_t)n == len ? 0 : -EIO;
}

static int device_read(struct luvmm_trap *t, uint64_t off, void *data, uint32_t len)
{
	ssize_t n;

	do
		n = pread(t->fd, data, len, (off_t)(t->offset + off));
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	if ((uint32_t)n != len)
		memset((uint8_t *)data + n, 0xff, len - n);
	return 0;
}

/* One store to a portal: combined into whole 64-byte descriptors per line. */
static int portal_store(struct luvmm_loop *l, struct luvmm_trap *t, uint64_t off, const uint8_t *data,
			uint32_t len)
{
	int64_t line = (int64_t)(off & ~(uint64_t)63);
	uint32_t pos = (uint32_t)(off - (uint64_t)line);
	uint64_t bits;

	if (pos + len > 64)
		return 0; /* a store across two portal lines: dropped, as the device would */
	if (l->portal_line != line || l->portal_trap != (uint32_t)(t - l->traps)) {
		memset(l->portal, 0, sizeof(l->portal));
		l->portal_mask = 0;
	}
	bits = (len == 64 ? ~0ULL : ((1ULL << len) - 1)) << pos;
	if (l->portal_mask & bits) { /* a store to bytes already written: a new descriptor began */
		memset(l->portal, 0, sizeof(l->portal));
		l->portal_mask = 0;
	}
	memcpy(l->portal + pos, data, len);
	l->portal_mask |= bits;
	l->portal_line = line;
	l->portal_trap = (uint32_t)(t - l->traps);
	if (l->portal_mask != ~0ULL)
		return 0;
	l->portal_mask = 0;
	l->portal_line = -1;
	l->portal_writes++;
	return device_write(t, (uint64_t)line, l->portal, 64);
}

/* 1: served here; 0: the VMM's; <0: the device access failed. */
static int mmio(struct luvmm_loop *l, struct kvm_run *run)
{
	uint64_t addr = run->mmio.phys_addr;
	uint32_t len = run->mmio.len, i;

	if (len == 0 || len > sizeof(run->mmio.data))
		return 0;
	for (i = 0; i < l->ntraps; i++) {
		struct luvmm_trap *t = &l->traps[i];
		uint64_t off = addr - t->gpa;
		int err;

		if (addr < t->gpa || off + len > t->size)
			continue;
		if (t->kind == LUVMM_TRAP_PORTAL) {
			if (run->mmio.is_write) {
				err = portal_store(l, t, off, run->mmio.data, len);
			} else {
				memset(run->mmio.data, 0, len); /* portals read as zero */
				err = 0;
			}
		} else if (t->kind == LUVMM_TRAP_REGION) {
			if (run->mmio.is_write)
				err = device_write(t, off, run->mmio.data, len);
			else if (t->transport == LUVMM_XPORT_POSTED)
				return 0; /* a read needs the socket's reply: the VMM's */
			else
				err = device_read(t, off, run->mmio.data, len);
		} else {
			return 0;
		}
		if (err)
			return err;
		if (run->mmio.is_write)
			t->writes++;
		else
			t->reads++;
		return 1;
	}
	return 0;
}

static void wait_irq(struct luvmm_loop *l, struct kvm_run *run)
{
	struct pollfd p = { .fd = l->irq_fd, .events = POLLIN };
	uint64_t n;

	l->irq_waits++;
	if (l->irq_fd < 0 || run->immediate_exit)
		return; /* no interrupt to wait for; or kicked: the VMM wants the vCPU */
	if (poll(&p, 1, (int)l->wait_ms) == 1 && read(l->irq_fd, &n, sizeof(n)) == sizeof(n))
		__atomic_add_fetch(&l->interrupts, n, __ATOMIC_RELAXED);
}

static void port_io(struct luvmm_loop *l, struct kvm_run *run)
{
	if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == l->wait_port && l->wait_port) {
		wait_irq(l, run);
		return;
	}
	l->io_ignored++;
	if (run->io.direction == KVM_EXIT_IO_IN)
		memset((uint8_t *)run + run->io.data_offset, 0xff, (size_t)run->io.size * run->io.count);
}

/* --- MOVDIR64B ------------------------------------------------------------------------ */

/* ModRM/SIB register number -> index in struct kvm_regs (rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8..r15). */
static const uint8_t kvm_reg[16] = { 0, 2, 3, 1, 6, 7, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15 };
#define KVM_REGS_RIP 16

int luvmm_movdir64b_decode(const uint8_t *insn, uint32_t len, const uint64_t *regs, uint64_t *dest,
			   uint64_t *src, uint32_t *insn_len)
{
	uint32_t pos = 0, disp_size = 0;
	int opsize = 0, addr32 = 0, rip_relative = 0;
	uint8_t rex = 0, modrm, mod, reg, rm;
	uint64_t base = 0, address;
	int64_t disp = 0;

	for (; pos < len; pos++) {
		uint8_t b = insn[pos];

		if (b == 0x66)
			opsize = 1;
		else if (b == 0x67)
			addr32 = 1;
		else if (!(b == 0xf2 || b == 0xf3 || b == 0x2e || b == 0x3e || b == 0x26 || b == 0x36 ||
			   b == 0x64 || b == 0x65))
			break;
	}
	if (pos < len && (insn[pos] & 0xf0) == 0x40)
		rex = insn[pos++];
	if (!opsize || pos + 4 > len || insn[pos] != 0x0f || insn[pos + 1] != 0x38 || insn[pos + 2] != 0xf8)
		return -1;
	pos += 3;
	modrm = insn[pos++];
	mod = modrm >> 6;
	reg = ((modrm >> 3) & 7) | (rex & 4) << 1;
	rm = modrm & 7;
	if (mod == 3)
		return -1; /* the source must be memory */
	if (rm == 4) { /* SIB */
		uint8_t sib, scale, index, b;

		if (pos >= len)
			return -1;
		sib = insn[pos++];
		scale = sib >> 6;
		index = ((sib >> 3) & 7) | (rex & 2) << 2;
		b = (sib & 7) | (rex & 1) << 3;
		if (index != 4)
			base = regs[kvm_reg[index]] << scale;
		if ((b & 7) == 5 && mod == 0) {
			disp_size = 4;
		} else {
			base += regs[kvm_reg[b]];
			disp_size = mod == 1 ? 1 : mod == 2 ? 4 : 0;
		}
	} else if (rm == 5 && mod == 0) {
		rip_relative = 1;
		disp_size = 4;
	} else {
		base = regs[kvm_reg[rm | (rex & 1) << 3]];
		disp_size = mod == 1 ? 1 : mod == 2 ? 4 : 0;
	}
	if (pos + disp_size > len)
		return -1;
	if (disp_size == 1) {
		disp = (int8_t)insn[pos];
	} else if (disp_size == 4) {
		int32_t d;

		memcpy(&d, insn + pos, 4);
		disp = d;
	}
	pos += disp_size;
	if (rip_relative) /* relative to the next instruction */
		base = regs[KVM_REGS_RIP] + pos;
	address = base + (uint64_t)disp;
	*dest = regs[kvm_reg[reg]];
	*src = address;
	if (addr32) {
		*src &= 0xffffffffULL;
		*dest &= 0xffffffffULL;
	}
	*insn_len = pos;
	return 0;
}

static uint8_t *guest_ptr(struct luvmm_loop *l, uint64_t gpa, uint64_t len)
{
	uint32_t i;

	for (i = 0; i < l->nram; i++)
		if (gpa >= l->ram[i].gpa && gpa - l->ram[i].gpa + len <= l->ram[i].size)
			return l->ram[i].hva + (gpa - l->ram[i].gpa);
	return NULL;
}

int luvmm_translate(struct luvmm_loop *l, uint64_t cr3, uint64_t gva, uint64_t *gpa)
{
	static const int shifts[4] = { 39, 30, 21, 12 };
	uint64_t table = cr3 & 0x000ffffffffff000ULL, entry;
	int level;

	for (level = 0; level < 4; level++) {
		int shift = shifts[level];
		uint8_t *p = guest_ptr(l, table + ((gva >> shift) & 0x1ff) * 8, 8);

		if (!p)
			return -1;
		memcpy(&entry, p, 8);
		if (!(entry & 1))
			return -1;
		if ((shift == 30 || shift == 21) && (entry & 0x80)) { /* a 1 GiB or 2 MiB page */
			uint64_t mask = (1ULL << shift) - 1;

			*gpa = (entry & 0x000ffffffffff000ULL & ~mask) | (gva & mask);
			return 0;
		}
		table = entry & 0x000ffffffffff000ULL;
	}
	*gpa = table | (gva & 0xfff);
	return 0;
}

/* 1: done (the descriptor written, RIP past it); 0: not a MOVDIR64B to a portal; <0: failed. */
static int movdir64b(struct luvmm_loop *l, struct kvm_run *run)
{
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	uint64_t dest, src, gpa, part;
	uint32_t len, i;
	uint8_t desc[64], *p;
	int err;

	if (run->emulation_failure.suberror != KVM_INTERNAL_ERROR_EMULATION ||
	    !(run->emulation_failure.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES))
		return 0;
	if (ioctl(l->vcpu_fd, KVM_GET_REGS, &regs) < 0)
		return -errno;
	if (luvmm_movdir64b_decode(run->emulation_failure.insn_bytes, run->emulation_failure.insn_size,
				   (const uint64_t *)&regs, &dest, &src, &len))
		return 0;
	for (i = 0; i < l->ntraps; i++)
		if (l->traps[i].kind == LUVMM_TRAP_PORTAL && dest >= l->traps[i].gpa &&
		    dest - l->traps[i].gpa + 64 <= l->traps[i].size)
			break;
	if (i == l->ntraps || dest % 64)
		return 0;
	if (ioctl(l->vcpu_fd, KVM_GET_SREGS, &sregs) < 0)
		return -errno;
	for (part = 0; part < 64; part += len) { /* the source may cross a page */
		len = (uint32_t)(4096 - ((src + part) & 4095));
		if (len > 64 - part)
			len = (uint32_t)(64 - part);
		if (luvmm_translate(l, sregs.cr3, src + part, &gpa) || !(p = guest_ptr(l, gpa, len)))
			return 0;
		memcpy(desc + part, p, len);
	}
	err = device_write(&l->traps[i], dest - l->traps[i].gpa, desc, 64);
	if (err)
		return err;
	l->traps[i].writes++;
	l->portal_writes++;
	l->movdir64b++;
	luvmm_movdir64b_decode(run->emulation_failure.insn_bytes, run->emulation_failure.insn_size,
			       (const uint64_t *)&regs, &dest, &src, &len);
	regs.rip += len;
	if (ioctl(l->vcpu_fd, KVM_SET_REGS, &regs) < 0)
		return -errno;
	return 1;
}

/* --- the loop ------------------------------------------------------------------------------ */

int luvmm_serve(struct luvmm_loop *l)
{
	struct kvm_run *run = l->run;
	int err = 0;

	if (run->exit_reason < LUVMM_EXIT_REASONS)
		l->exits[run->exit_reason]++;
	switch (run->exit_reason) {
	case KVM_EXIT_MMIO:
		err = mmio(l, run);
		break;
	case KVM_EXIT_IO:
		port_io(l, run);
		return LUVMM_SERVED;
	case KVM_EXIT_INTERNAL_ERROR:
		err = movdir64b(l, run);
		break;
	}
	if (err > 0)
		return LUVMM_SERVED;
	l->handed++;
	if (err < 0) {
		l->error = -err;
		return LUVMM_EXIT_DEVICE_ERROR;
	}
	return (int)run->exit_reason;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

int luvmm_run(struct luvmm_loop *l)
{
	struct kvm_run *run = l->run;
	uint64_t t0, dt;
	int ret;

	for (;;) {
		if (ioctl(l->vcpu_fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR) {
				/* A kick (signal, or immediate_exit): the VMM decides. */
				run->immediate_exit = 0;
				l->exits[KVM_EXIT_INTR]++;
				l->handed++;
				return KVM_EXIT_INTR;
			}
			return -errno;
		}
		t0 = now_ns();
		ret = luvmm_serve(l);
		dt = now_ns() - t0;
		l->serve_ns += dt;
		if (dt > l->max_serve_ns)
			l->max_serve_ns = dt;
		if (ret != LUVMM_SERVED)
			return ret;
	}
}

uint64_t luvmm_rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (uint64_t)hi << 32 | lo;
}
