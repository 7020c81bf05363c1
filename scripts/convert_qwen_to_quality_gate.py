"""The seed's Stage 0 command (an alias of ``quality-gate convert``; see quality_gate/convert.py).

    python scripts/convert_qwen_to_quality_gate.py --model Qwen/Qwen3-1.7B \
        --save-path converted_models/quality_gate_Qwen3-1.7B
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quality_gate.convert import main

if __name__ == "__main__":
    main()
