import os

# Triton picks interpreter-or-GPU when a kernel is decorated, i.e. when kernels.exit_head is first imported.
# If another test directory imported it earlier without this flag, test_exit_head.py reruns itself in a
# fresh process. Run the suite on a real GPU with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")
