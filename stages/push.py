"""Stage 6: publish the LoRA adapter (hub.adapter_repo_id) and the merged 16-bit model (hub.repo_id)
to the Hugging Face Hub, each with a generated model card, or say what would be published.

Publishes only with a repo id set and HF_TOKEN in the environment; the token is never printed or
written anywhere. Writes each repo's model card to reports/hub/<adapter|merged>/README.md and
reports/push.json on success (also for a dry run: the receipt maps every file it would upload to its
local source); a rerun with an unchanged model uploads nothing. A failed push leaves no receipt behind.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from grpo_gsm8k import config, hub
from grpo_gsm8k.outputs import write_json

RECEIPT = "reports/push.json"


def main() -> None:
    token = os.environ.get("HF_TOKEN") or None
    try:
        p = config.load()
        hub.check_push(p, token)
        hub.check_online(p)
        receipt = hub.publish(p, token, RECEIPT)
    except config.ConfigError as err:
        sys.exit(f"error: {hub.scrub(str(err), token)}")
    except hub.HubError as err:
        Path(RECEIPT).unlink(missing_ok=True)  # nothing may claim a push that did not happen
        sys.exit(f"error: {hub.scrub(str(err), token)}\n(no receipt: {RECEIPT} removed)")
    write_json(RECEIPT, receipt)
    print("\n".join(hub.summary_lines(receipt)))


if __name__ == "__main__":
    main()
