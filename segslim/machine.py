"""What this machine gives this process: the cores it may use, and whether other work holds
them."""
import os


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; all of them off Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_busy() -> bool:
    """Whether other work holds this machine's cores: the one-minute load average (runnable
    threads, this process's own included) is a whole thread or more above usable_cores."""
    try:
        return os.getloadavg()[0] >= usable_cores() + 1
    except OSError:  # no load average here
        return False
