"""On-device decoding: commit rules, exit schedules, the while_loop engine and `generate`."""

from dlmjax.decode.api import PRESETS, GenerateOutput, generate
from dlmjax.decode.method import Method, compose

__all__ = ["generate", "GenerateOutput", "Method", "compose", "PRESETS"]
