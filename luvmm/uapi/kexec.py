"""kexec_file_load(2), as include/uapi/linux/kexec.h and the x86-64 syscall
table (arch/x86/entry/syscalls/syscall_64.tbl -> asm/unistd_64.h) name it."""

__NR_kexec_file_load = 320  # x86-64

KEXEC_FILE_UNLOAD = 0x00000001
KEXEC_FILE_ON_CRASH = 0x00000002
KEXEC_FILE_NO_INITRAMFS = 0x00000004
KEXEC_FILE_DEBUG = 0x00000008
