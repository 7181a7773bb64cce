"""A launcher of PythonSlicer's shape, for tests: ``python slicer_launcher.py REAL_PYTHON ARGS...``.

Slicer's ``PythonSlicer`` is CTKAppLauncher (commontk/AppLauncher ``Base/ctkAppLauncher.cpp``): it starts the
real interpreter (``python-real``) as its child with forwarded stdin, stdout and stderr (a QProcess with
ForwardedChannels and ForwardedInputChannel), waits, and exits with the child's exit code, or prints "exit
abnormally" and exits 1 when the child crashed. It handles no signal: killing the launcher alone leaves the child
running. This script does the same, no more.
"""
import subprocess
import sys

if __name__ == "__main__":
    child = subprocess.Popen(sys.argv[1:])  # stdin, stdout and stderr are inherited: forwarded
    code = child.wait()
    if code < 0:
        print(f"{sys.argv[1]} exit abnormally - Report the problem.", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code)
