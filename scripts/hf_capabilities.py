"""Write src/evalfleet/planning/hf_capabilities.json from the transformers installed here.

The table says which model families transformers can split by tensor parallelism (a tp plan in the
config class), into pipeline stages (Llama-style modules) and by layers in one process (a device_map,
which needs the blocks to keep whole: `_no_split_modules`), so that `evalfleet plan` answers
without importing torch. Run it after changing the tested transformers version (Makefile's
TRANSFORMERS_PIN); tests/planning/test_hf_capabilities.py checks the table against the live answer.
"""

from __future__ import annotations

import json

from evalfleet.planning.backends import HF_TABLE, read_hf_table

if __name__ == "__main__":
    HF_TABLE.write_text(json.dumps(read_hf_table(), indent=1) + "\n")
    print(f"wrote {HF_TABLE}")
