"""Live Update Orchestrator uAPI (include/uapi/linux/liveupdate.h, Linux >= 6.19).

/dev/liveupdate takes CREATE_SESSION and RETRIEVE_SESSION; the session fds they
return take PRESERVE_FD, RETRIEVE_FD, FINISH and GET_NAME.  Every struct starts
with ``size`` (the extensible-struct convention): too small is EINVAL,
non-zero bytes past what the kernel knows are E2BIG.
"""

from luvmm.abi import _IO, cdef, ioctl, structs

LIVEUPDATE_IOCTL_TYPE = 0xBA
LIVEUPDATE_SESSION_NAME_LENGTH = 64

cdef(
    f"""
    struct liveupdate_ioctl_create_session {{
        uint32_t size;
        int32_t fd;
        uint8_t name[{LIVEUPDATE_SESSION_NAME_LENGTH}];
    }};

    struct liveupdate_ioctl_retrieve_session {{
        uint32_t size;
        int32_t fd;
        uint8_t name[{LIVEUPDATE_SESSION_NAME_LENGTH}];
    }};

    struct liveupdate_session_preserve_fd {{
        uint32_t size;
        int32_t fd;
        uint64_t token;
    }};

    struct liveupdate_session_retrieve_fd {{
        uint32_t size;
        int32_t fd;
        uint64_t token;
    }};

    struct liveupdate_session_finish {{
        uint32_t size;
        uint32_t reserved;
    }};

    struct liveupdate_session_get_name {{
        uint32_t size;
        uint32_t reserved;
        uint8_t name[{LIVEUPDATE_SESSION_NAME_LENGTH}];
    }};
    """
)

structs(__name__, "struct liveupdate_ioctl_create_session", "struct liveupdate_ioctl_retrieve_session",
        "struct liveupdate_session_preserve_fd", "struct liveupdate_session_retrieve_fd",
        "struct liveupdate_session_finish", "struct liveupdate_session_get_name")

LIVEUPDATE_CMD_BASE = 0x00
LIVEUPDATE_CMD_CREATE_SESSION = 0x00
LIVEUPDATE_CMD_RETRIEVE_SESSION = 0x01
LIVEUPDATE_CMD_SESSION_BASE = 0x40
LIVEUPDATE_CMD_SESSION_PRESERVE_FD = 0x40
LIVEUPDATE_CMD_SESSION_RETRIEVE_FD = 0x41
LIVEUPDATE_CMD_SESSION_FINISH = 0x42
LIVEUPDATE_CMD_SESSION_GET_NAME = 0x43

LIVEUPDATE_IOCTL_CREATE_SESSION = ioctl(
    "LIVEUPDATE_IOCTL_CREATE_SESSION", _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_CREATE_SESSION),
    "struct liveupdate_ioctl_create_session", out_fd_fields=("fd",))
LIVEUPDATE_IOCTL_RETRIEVE_SESSION = ioctl(
    "LIVEUPDATE_IOCTL_RETRIEVE_SESSION", _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_RETRIEVE_SESSION),
    "struct liveupdate_ioctl_retrieve_session", out_fd_fields=("fd",))
LIVEUPDATE_SESSION_PRESERVE_FD = ioctl(
    "LIVEUPDATE_SESSION_PRESERVE_FD", _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_PRESERVE_FD),
    "struct liveupdate_session_preserve_fd", fd_fields=("fd",))
LIVEUPDATE_SESSION_RETRIEVE_FD = ioctl(
    "LIVEUPDATE_SESSION_RETRIEVE_FD", _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_RETRIEVE_FD),
    "struct liveupdate_session_retrieve_fd", out_fd_fields=("fd",))
LIVEUPDATE_SESSION_FINISH = ioctl(
    "LIVEUPDATE_SESSION_FINISH", _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_FINISH),
    "struct liveupdate_session_finish")
LIVEUPDATE_SESSION_GET_NAME = ioctl(
    "LIVEUPDATE_SESSION_GET_NAME", _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_GET_NAME),
    "struct liveupdate_session_get_name")
