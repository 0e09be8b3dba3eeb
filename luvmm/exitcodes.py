"""luvmm's exit statuses, one table for every command (docs/cli.md, "Exit status").

    0  OK            all good: what was asked was done, and every live update
                     kept the VM, its device and its DMA whole
    1  FAILED        what was asked could not be done (no such VM, no host
                     running, an update refused or rolled back, a VM not
                     running): the message says why; nothing was changed,
                     or it was put back as it was
    2  USAGE         the command line is wrong (argparse's own status)
    3  DAMAGED       the live updates happened, but DMA was damaged (errors,
                     corrupted copies, work lost) or the guest did not go on
    4  DEVICE_RESET  the live updates happened and the VM survived, but the
                     kernel reset its device: DMA stopped and the work in
                     flight was lost -- the expected finding of a kernel
                     without DMA continuity (kernel profile reset-on-freeze)
  130  INTERRUPTED   stopped by Ctrl-C (SIGINT) after cleaning up; what was
                     done so far is printed
"""

OK = 0
FAILED = 1
USAGE = 2
DAMAGED = 3
DEVICE_RESET = 4
INTERRUPTED = 130
