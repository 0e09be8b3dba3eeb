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
};

#endif
