"""Fused exit-decision kernel (Triton) beside its torch reference; `exit_head` dispatches between them.

`kernels.exit_head` is the dispatcher function; reach the module itself with
`importlib.import_module("kernels.exit_head")` or `from kernels.exit_head import ...`.
"""
from .exit_head import (ExitDecision, KernelConfig, exit_head, exit_head_reference, exit_head_triton,
                        gumbel_noise, pick_config)

__all__ = ["ExitDecision", "KernelConfig", "exit_head", "exit_head_reference", "exit_head_triton",
           "gumbel_noise", "pick_config"]
