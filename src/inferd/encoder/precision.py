"""Reduced-precision encoders, served only where they stay faithful to float32.

When the server picks the dtype (``--dtype auto`` on a CPU with native bf16 dot products), an
encoder is loaded in float32, run once over fixed probe inputs, switched to bfloat16 and run again:
it keeps bfloat16 only if every probe embedding's cosine to its float32 self is at least
``COSINE_GATE``, or, for a cross-encoder, if every probe query ranks its documents in the same
order (near-ties aside). Otherwise the model is loaded again in float32 and the server says why. A dtype asked for by
name is served as asked, without the check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from inferd.encoder.models.base import EncoderModel, prepare_batch
from inferd.encoder.request import Item

COSINE_GATE = 0.9999  # issue 17: embeddings within this cosine of float32, or float32 is served
RANK_TIE = 1e-3  # of a probe query's float32 score range: documents closer than this may swap

# Written for this check: prose, a question, code, numbers, a list, other languages, a long passage.
PROBE_TEXTS = (
    "How long does the ferry to the island take when the wind is from the west?",
    "The committee postponed its decision until the auditors had reviewed the third-quarter accounts.",
    "def mean(values):\n    return sum(values) / len(values) if values else 0.0",
    "Order #48213 shipped on 2024-03-07: 3 x USB-C cable (2 m), 1 x charger, total EUR 41.85.",
    "Symptoms include a dry cough, mild fever and fatigue that lasts for more than a week.",
    "Les horaires d'ouverture de la bibliothèque changent pendant les vacances scolaires.",
    "Die Messung wurde dreimal wiederholt, und der Mittelwert lag bei 4,2 Millimetern.",
    "東京駅から空港までの電車は約三十分かかります。",
    "ok",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 10;",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside chloroplasts.",
    "- preheat the oven\n- mix flour, butter and sugar\n- bake for twenty minutes",
    "The defendant argued that the contract was void because it had been signed under duress.",
    "Is it safe to update the firmware while the device is charging?",
    " ".join(
        [
            "Retrieval systems split long documents into passages, embed each passage once, and compare a "
            "query's embedding with all of them; the closest passages are handed to a language model, "
            "which answers from them. When the embeddings drift, the wrong passages win."
        ]
        * 3
    ),
    "A quiet street, two bakeries, and a park where the same old man feeds the pigeons every day.",
)
PROBE_GROUPS = (
    (
        "what causes the seasons on earth",
        (
            "The tilt of Earth's axis changes how directly sunlight reaches each hemisphere over a year.",
            "Seasons are caused by the changing distance between the Earth and the Sun.",
            "The football season starts in August and ends in May.",
            "Winter tyres grip better on snow and ice than summer tyres.",
            "Axial tilt of about 23.4 degrees gives the year its summer and winter.",
        ),
    ),
    (
        "how do I reset my router password",
        (
            "Hold the reset button for ten seconds to restore the router's factory settings.",
            "Log in to the router's admin page and choose Change password under Security.",
            "Our bakery opens at seven and closes at noon on Sundays.",
            "Passwords should be long and unique for every account.",
            "Routers forward packets between networks.",
        ),
    ),
    (
        "side effects of ibuprofen",
        (
            "Ibuprofen can cause stomach upset, heartburn and, rarely, bleeding in the gut.",
            "Take ibuprofen with food to reduce irritation of the stomach.",
            "Paracetamol and ibuprofen act in different ways.",
            "The museum's new wing houses modern sculpture.",
            "Common side effects of many painkillers include nausea and dizziness.",
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class Verdict:
    passed: bool
    detail: str  # what was compared and how close it came, for the log


def switch_if_faithful(model: EncoderModel, dtype: torch.dtype) -> Verdict:
    """Run the probe on ``model`` (loaded in float32), switch it to ``dtype`` and run it again. The
    switch cannot be undone: on a failed verdict the caller loads the model again."""
    batch = _probe_batch(model)
    with torch.inference_mode():
        reference = model.forward(batch).numpy()
        model.set_dtype(dtype)
        candidate = model.forward(batch).numpy()
    if not (np.isfinite(reference).all() and np.isfinite(candidate).all()):
        return Verdict(False, "non-finite outputs on the probe inputs")
    if model.info.scoring == "cross-encoder":
        return _same_rankings(reference, candidate, torch.finfo(dtype).eps)
    cosine = (reference * candidate).sum(1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1) + 1e-30
    )
    worst = float(cosine.min())
    return Verdict(
        worst >= COSINE_GATE,
        f"cosine to float32 at worst {worst:.6f} over {len(cosine)} probe texts (gate {COSINE_GATE})",
    )


def _same_rankings(reference: np.ndarray, candidate: np.ndarray, eps: float) -> Verdict:
    """Whether every probe query ranks its documents as float32 does. Documents whose float32
    scores lie within RANK_TIE of the group's score range of each other are ties, free to swap, and
    so are scores closer than one step of the reduced dtype (``eps`` relative: a cross-encoder cast
    whole writes its logits in that dtype, 0.0625 apart near 10 in bfloat16); a group whose scores
    are all ties fails."""
    changed, start = 0, 0
    for _, documents in PROBE_GROUPS:
        end = start + len(documents)
        ref, cand = reference[start:end], candidate[start:end]
        ref_gaps, cand_gaps = ref[:, None] - ref[None, :], cand[:, None] - cand[None, :]
        tie = max(RANK_TIE * float(ref.max() - ref.min()), 2 * eps * float(np.abs(ref).max()))
        ordered = ref_gaps > tie
        # A group with nothing but ties is lost too: float32 told its documents apart, the reduced
        # dtype cannot (a model whose scores differ by less than that dtype resolves).
        if not ordered.any() or (ordered & (cand_gaps <= 0)).any():
            changed += 1
        start = end
    return Verdict(
        changed == 0,
        f"{changed} of {len(PROBE_GROUPS)} probe queries ranked their documents differently from float32, "
        f"largest score change {float(np.abs(reference - candidate).max()):.4f}",
    )


def _probe_batch(model: EncoderModel):
    tokenizer = model.tokenizer
    if model.info.scoring == "cross-encoder":
        encoded = [
            pair
            for query, documents in PROBE_GROUPS
            for pair in tokenizer.encode_pairs(query, list(documents), truncate=True, side="right")
        ]
    else:
        encoded = tokenizer.encode_texts(list(PROBE_TEXTS), truncate=True, side="right")
    items = [Item(None, i, e.input_ids, e.token_type_ids) for i, e in enumerate(encoded)]  # type: ignore[arg-type]
    return prepare_batch(items, tokenizer.pad_token_id, model.uses_token_type_ids, model.is_packed)
