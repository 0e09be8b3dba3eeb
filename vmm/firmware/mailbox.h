/*
 * The mailbox page shared by the VMM and the guest firmware (GPA 0x8000).
 * The VMM writes the configuration before the first vCPU runs; the guest
 * writes the counters.  vmm/guest.py mirrors this layout (MAILBOX_FIELDS).
 */
#ifndef LUVMM_MAILBOX_H
#define LUVMM_MAILBOX_H

#define MAILBOX_GPA 0x8000UL
#define MAILBOX_MAGIC 0x584f424d4d56554cULL /* "LUVMMBOX" */

struct mailbox {
	/* written by the VMM */
	unsigned long long magic;
	unsigned long long bar0;	/* GPA of the DSA's BAR0 */
	unsigned long long bar2;	/* GPA of the DSA's BAR2 (portals) */
	unsigned long long dma_base;	/* GPA (= IOVA) of the DMA area */
	unsigned long long slots;	/* batches kept in flight */
	unsigned long long pairs;	/* MEMMOVE + COMPVAL pairs per batch */
	unsigned long long xfer;	/* bytes per MEMMOVE */
	unsigned long long init_device;	/* 1: reset and configure the DSA first */
	/* written by the guest */
	unsigned long long state;	/* 1 initialising, 2 running, 3 device error */
	unsigned long long heartbeat;
	unsigned long long submitted;	/* batches */
	unsigned long long completed;	/* batches whose record came back */
	unsigned long long descs_ok;	/* descriptors that completed successfully */
	unsigned long long errors;	/* batches that did not succeed */
	unsigned long long verify_failures; /* COMPVAL found the copy wrong */
	unsigned long long last_error;	/* status of the last failed batch */
	unsigned long long inflight;
	unsigned long long init_error;	/* CMDSTS error of a failed init command */
	unsigned long long recoveries;	/* restarts by a new VMM on the same RAM and device */
	unsigned long long aux_heartbeat[16]; /* one per secondary vCPU */
	/* after the counters so that their offsets never move; written by the VMM */
	unsigned long long driver;	/* DRIVER_DSA, or DRIVER_EDU: QEMU's edu */
	unsigned long long device_resets; /* bumped when the device came back reset */
	unsigned long long tsc_mult;	/* ns = TSC * tsc_mult >> 32; 0: no stamps */
	unsigned long long pace_period_ns; /* the pace ring's period; 0: no ring */
	/* written by the guest */
	unsigned long long pace_head;	/* entries written to the pace ring since boot */
	unsigned long long movdir64b;	/* 1: descriptors go to the portal by MOVDIR64B */
};

/*
 * The guest's own record of its pace, for a host with no observer on its bus
 * (a real one): every pace_period_ns of its TSC clock, vCPU 0's loop appends
 * (ns, heartbeat) at pace_head % PACE_RING_ENTRIES, then bumps pace_head.
 * The VMM reads it after a live update (guest_recovery_s, guest_lost_s).
 */
#define PACE_RING_GPA 0x80000UL
#define PACE_RING_ENTRIES 4096

struct pace_entry {
	unsigned long long ns;
	unsigned long long heartbeat;
};

/*
 * A write to this I/O port asks the VMM to wait for the device's interrupt
 * (bounded) before it runs the vCPU again: the firmware runs at CPL 3 with no
 * interrupt handler and cannot HLT, and polling a register that takes 100 ms
 * to change would keep a host CPU busy in VM exits.
 */
#define LUVMM_PORT_WAIT_IRQ 0x0500

#define DRIVER_DSA 0
#define DRIVER_EDU 1

/* The edu driver's record, at dma_base (vmm/guest.py: EDU_RECORD_FIELDS). */
struct edu_record {
	unsigned long long seq_in_flight;	/* the transfer under way, 0 if none */
	unsigned long long phase;		/* EDU_IDLE, EDU_TO_DEVICE, EDU_FROM_DEVICE */
	unsigned long long redone;		/* transfers started again after a device reset */
	unsigned long long last_heartbeat_ns;
	unsigned long long max_heartbeat_gap_ns;
	unsigned long long last_completion_ns;
	unsigned long long max_completion_gap_ns;
};

#define EDU_IDLE 0
#define EDU_TO_DEVICE 1
#define EDU_FROM_DEVICE 2
#define EDU_SRC_OFFSET 0x1000		/* from dma_base */
#define EDU_DST_OFFSET 0x2000
#define EDU_XFER 2048			/* strictly inside the device's 4 KiB buffer */

#endif
