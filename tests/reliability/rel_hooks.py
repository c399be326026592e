"""Runs a tool in a subprocess with faults injected on cue; for the reliability tests only.

    python tests/reliability/rel_hooks.py TOOL [the tool's arguments ...]

TOOL is cls_train, cls_valid, seg_train, seg_test or extract_state_dict. The library is not changed: step faults
are trainer hooks handed to the training tools; the other faults wrap functions of this process (torch.save, the
loss, the PNG writer) before the tool starts, as chosen by environment variables:

REL_MARKER          a file to create when a pause or a hang begins (the test waits for it, then kills us)
REL_PAUSE_AT_STEP   at the N-th training step of this process (counted from 1, at the bad-step check, after the
                    backward pass and before the optimizer step), create REL_MARKER and sleep
REL_HANG_IN_SAVE    in the N-th torch.save of this process, write half of the bytes, create REL_MARKER and sleep
REL_DISK_FULL_IN_SAVE  in the N-th torch.save of this process, write half of the bytes, then fail as a full disk
                    does (OSError ENOSPC)
REL_KILL_AT_STEP    at the N-th training step, SIGKILL this process if it is rank REL_KILL_RANK (default 1) and
                    the first attempt of an elastic job (TORCHELASTIC_RESTART_COUNT 0 or unset)
REL_SIGNAL_AT_STEP  at the N-th training step, send REL_SIGNAL (default SIGTERM) to this process if it is rank
                    REL_SIGNAL_RANK (default 0), in the first attempt of an elastic job
REL_NAN_STEPS       comma-separated training steps (counted from 1) whose cross-entropy loss is NaN
REL_AUDIT_DIR       record every file this process opens for writing, renames or writes as a PNG, one line
                    "event<TAB>path" a file, in REL_AUDIT_DIR/writes_rank<R>_attempt<A>_pid<P>.tsv
REL_AUDIT_ROOT      only paths under this folder are recorded (default: everything outside REL_AUDIT_DIR)

Every process runs with one thread.
"""
import importlib.util
import io
import os
import signal
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL_FILES = {
    "cls_train": os.path.join("tools", "cls_train.py"),
    "cls_valid": os.path.join("tools", "cls_valid.py"),
    "seg_train": os.path.join("tools", "seg_train.py"),
    "seg_test": os.path.join("tools", "seg_test.py"),
    "extract_state_dict": os.path.join("pretrained_models", "extract_state_dict.py"),
}
SLEEP_S = 600  # long enough for any test to kill us first; the tests' own timeouts end a forgotten process


def _int_env(name):
    value = os.environ.get(name, "")
    return int(value) if value else 0


def _attempt():
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _rank():
    return int(os.environ.get("RANK", "0") or 0)


def _touch_marker():
    marker = os.environ.get("REL_MARKER")
    if marker:
        with open(marker + ".part", "w") as fh:
            fh.write(str(os.getpid()))
        os.replace(marker + ".part", marker)


def step_hooks():
    """The trainer hooks that pause, kill or signal this process at a chosen step (after the backward pass, before
    the optimizer update); an empty list when none is asked for."""
    pause_at = _int_env("REL_PAUSE_AT_STEP")
    kill_at = _int_env("REL_KILL_AT_STEP")
    kill_rank = int(os.environ.get("REL_KILL_RANK", "1"))
    signal_at = _int_env("REL_SIGNAL_AT_STEP")
    signal_rank = int(os.environ.get("REL_SIGNAL_RANK", "0"))
    signal_name = os.environ.get("REL_SIGNAL", "SIGTERM")
    if not (pause_at or kill_at or signal_at):
        return []
    from mdeq.core.trainer import Hook

    class StepFaults(Hook):
        def __init__(self):
            self.count = 0

        def after_backward(self, trainer, epoch, batch, step):
            self.count += 1
            if kill_at and self.count == kill_at and _attempt() == 0 and _rank() == kill_rank:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            if signal_at and self.count == signal_at and _attempt() == 0 and _rank() == signal_rank:
                os.kill(os.getpid(), getattr(signal, signal_name))
            if pause_at and self.count == pause_at:
                _touch_marker()
                time.sleep(SLEEP_S)

    return [StepFaults()]


def _half_write_in_save(env_name, after_half):
    """Wraps torch.save: its N-th call (N from ``env_name``) that writes to an open file writes half of the bytes,
    then calls ``after_half(f)``."""
    nth = _int_env(env_name)
    if not nth:
        return
    import torch

    original = torch.save
    count = [0]

    def save(obj, f, *args, **kwargs):
        count[0] += 1
        if count[0] != nth or isinstance(f, (str, bytes, os.PathLike)):
            return original(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        original(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])  # half a checkpoint on disk, as a crash in the middle leaves it
        f.flush()
        return after_half(f)

    torch.save = save


def install_save_hang():
    def hang(f):
        os.fsync(f.fileno())
        _touch_marker()
        time.sleep(SLEEP_S)

    _half_write_in_save("REL_HANG_IN_SAVE", hang)


def install_disk_full():
    import errno

    def disk_full(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    _half_write_in_save("REL_DISK_FULL_IN_SAVE", disk_full)


def install_nan_loss():
    steps = {int(s) for s in os.environ.get("REL_NAN_STEPS", "").split(",") if s.strip()}
    if not steps:
        return
    import torch

    original = torch.nn.CrossEntropyLoss.forward
    count = [0]

    def forward(self, logits, target):
        loss = original(self, logits, target)
        if not torch.is_grad_enabled():  # evaluation: untouched
            return loss
        count[0] += 1
        return loss * float("nan") if count[0] in steps else loss

    torch.nn.CrossEntropyLoss.forward = forward


def install_audit():
    """Records this process's writes: the interpreter's audit events cover every open() and os.open() and the
    renames; PNGs (written by OpenCV in C++) are recorded where the library writes them."""
    folder = os.environ.get("REL_AUDIT_DIR")
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    record = os.path.join(folder, f"writes_rank{_rank()}_attempt{_attempt()}_pid{os.getpid()}.tsv")
    root = os.path.abspath(os.environ.get("REL_AUDIT_ROOT", os.sep))
    audit_dir = os.path.abspath(folder)
    busy = threading.local()
    handle = open(record, "a", buffering=1)

    def note(event, path):
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            return
        path = os.path.abspath(path)
        if path.startswith(audit_dir) or not path.startswith(root):
            return
        handle.write(f"{event}\t{path}\n")

    def hook(event, args):
        if getattr(busy, "on", False):
            return
        busy.on = True
        try:
            if event == "open" and args:
                path, mode, flags = (list(args) + [None, None])[:3]
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
                if writing:
                    note("open", path)
            elif event == "os.rename" and len(args) >= 2:
                note("rename", args[1])
        finally:
            busy.on = False

    sys.addaudithook(hook)

    from mdeq.core import seg_inference

    original_png = seg_inference._write_png

    def write_png(path, array):
        busy.on = True
        try:
            note("png", path)
        finally:
            busy.on = False
        return original_png(path, array)

    seg_inference._write_png = write_png


def main(argv):
    if not argv or argv[0] not in TOOL_FILES:
        print(f"usage: rel_hooks.py {{{','.join(TOOL_FILES)}}} [arguments]", file=sys.stderr)
        return 64
    import torch

    torch.set_num_threads(1)
    install_audit()
    install_save_hang()
    install_disk_full()
    install_nan_loss()
    path = os.path.join(REPO, TOOL_FILES[argv[0]])
    spec = importlib.util.spec_from_file_location(f"_rel_tool_{argv[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if argv[0] in ("cls_train", "seg_train"):
        return module.main(argv[1:], hooks=step_hooks())
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
