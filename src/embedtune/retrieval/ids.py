"""One id for one passage text, as NVIDIA's recipe derives it: ``"d_" + sha256(text)[:16]``.

Prep's NeMo AutoModel corpus, training rows and the platform's uploaded training data all name passages
this way, so the same text gets the same id whichever of them wrote it.
"""

from __future__ import annotations

import hashlib


def passage_id(text: str) -> str:
    return "d_" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
