"""What the benchmark sends: built-in prompts and passages, user files, and cold-prompt markers.

The built-in sets are fixed (no randomness), so two runs against two servers send the same text.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

# (subject, a note about it): the raw material of the built-in prompts, passages and queries.
SUBJECTS = (
    (
        "tide pools",
        "Tide pools form where the retreating sea leaves water trapped among rocks. The animals "
        "living there, such as anemones, limpets and small crabs, must survive heat, fresh rain and the "
        "pounding of waves twice a day, and many close their shells or hide in crevices until the water returns.",
    ),
    (
        "sourdough bread",
        "Sourdough rises thanks to a starter, a paste of flour and water colonised by wild "
        "yeasts and lactic acid bacteria. The bacteria give the bread its sour taste, the yeasts make the gas "
        "that lifts the dough, and a long cool fermentation lets both develop flavour before baking.",
    ),
    (
        "the printing press",
        "The movable-type printing press let workshops set a page from reusable metal "
        "letters, ink it and press it onto paper hundreds of times a day. Books became cheaper, spelling "
        "became more uniform, and ideas travelled across countries far faster than copyists could carry them.",
    ),
    (
        "beekeeping",
        "A honeybee colony holds one queen, a few hundred drones and tens of thousands of "
        "workers. Beekeepers give the colony removable frames so they can inspect the brood, harvest surplus "
        "honey in summer and leave enough stores for the bees to eat through the winter.",
    ),
    (
        "glaciers",
        "A glacier is a body of ice that flows slowly under its own weight. It grows where more "
        "snow falls each winter than melts each summer, grinds the rock beneath it into fine flour, and leaves "
        "behind U-shaped valleys, lakes and ridges of boulders when it retreats.",
    ),
    (
        "railway signalling",
        "Railway signals divide a line into blocks and allow only one train into each "
        "block at a time. Track circuits detect where trains are, interlockings stop a signal from showing "
        "green when points are set against it, and modern systems send speed limits straight to the cab.",
    ),
    (
        "composting",
        "Composting turns kitchen scraps and garden waste into a dark crumbly soil improver. "
        "Microbes do the work, and they need a mix of green material rich in nitrogen, brown material rich "
        "in carbon, some moisture and air, which is why a heap is turned every few weeks.",
    ),
    (
        "lighthouses",
        "A lighthouse marks a dangerous coast or a harbour entrance with a light that ships can "
        "recognise by its pattern of flashes. Fresnel lenses gather the lamp's light into a narrow beam "
        "visible for many kilometres, and most lights today run automatically without a keeper.",
    ),
    (
        "the violin",
        "A violin has four strings tuned in fifths, a hollow wooden body and a bridge that "
        "carries the strings' vibration to the top plate. The player draws a bow strung with horsehair across "
        "the strings and stops them with the fingers of the other hand to change the pitch.",
    ),
    (
        "volcanoes",
        "A volcano forms where molten rock reaches the surface through a weakness in the crust. "
        "Runny basalt lava builds broad gentle shields, while sticky silica-rich magma traps gas and can erupt "
        "explosively, throwing out ash that may circle the globe and cool the climate for a year.",
    ),
    (
        "map projections",
        "Every flat map of the round Earth distorts something. The Mercator projection "
        "keeps angles true, which suits navigation, but swells areas near the poles; equal-area projections "
        "keep sizes honest at the cost of bending shapes, and no projection can keep both.",
    ),
    (
        "cheese making",
        "Cheese making starts by curdling milk with rennet or acid so that the proteins "
        "clump into curds and release whey. The curds are cut, drained, salted and pressed, and the cheese is "
        "then aged for weeks or years while moulds and bacteria shape its texture and taste.",
    ),
    (
        "migratory birds",
        "Many birds fly thousands of kilometres between summer breeding grounds and winter "
        "feeding grounds. They find their way using the sun, the stars, the Earth's magnetic field and "
        "landmarks, and they fatten up beforehand because some crossings allow no rest at all.",
    ),
    (
        "the water cycle",
        "Water evaporates from oceans and lakes, condenses into clouds as the air rises and "
        "cools, and falls again as rain or snow. Part of it runs off in rivers, part soaks into the ground to "
        "refill aquifers, and plants return more of it to the air through their leaves.",
    ),
    (
        "chess openings",
        "The opening of a chess game is about developing pieces quickly, controlling the "
        "centre and keeping the king safe. Players study named openings such as the Sicilian or the Queen's "
        "Gambit to reach positions they understand, but memorised moves help little without their ideas.",
    ),
    (
        "solar panels",
        "A solar panel is made of cells of doped silicon in which sunlight knocks electrons "
        "loose and an internal electric field drives them into a current. An inverter turns that direct "
        "current into alternating current, and output falls when the panel is shaded, dirty or very hot.",
    ),
)

TASKS = (
    "Give three short facts about {subject}.",
    "Explain {subject} to a curious twelve-year-old in one paragraph, using a comparison with something "
    "from everyday life.",
    "Here is a note about {subject}: {note} Rewrite the note as a list of key points, then suggest two "
    "questions for a class discussion.",
    "Read the following notes carefully. {notes} Using only these notes, write a short article that "
    "connects {subject} with {other}, explains why each matters to people, and ends with one question "
    "the notes leave open.",
)

QUERIES = (
    "how do animals survive between tides",
    "why does sourdough taste sour",
    "what changed when books could be printed",
    "how do bees survive the winter",
    "how do glaciers shape valleys",
    "how do trains avoid collisions",
    "what does a compost heap need",
    "how can ships recognise a lighthouse",
    "how does a violin make sound",
    "why do some volcanoes explode",
    "which map projection keeps areas true",
    "how are curds made from milk",
    "how do birds navigate on migration",
    "where does rain water go",
    "what should a chess opening achieve",
    "why does a solar panel produce less power in the heat",
)


def builtin_prompts() -> list[list[dict]]:
    """64 single-turn chats: for each subject, a one-line request, an explanation, a note to restate
    and four notes to combine, so the set mixes short and long prompts (6 to about 230 words);
    prompt i uses task i % 4, so every prefix of the list mixes the four lengths."""
    out = []
    n = len(SUBJECTS)
    for k, (subject, note) in enumerate(SUBJECTS):
        notes = " ".join(f"Note {j + 1}: {SUBJECTS[(k + j) % n][1]}" for j in range(4))
        fields = {"subject": subject, "note": note, "notes": notes, "other": SUBJECTS[(k + 1) % n][0]}
        out += [[{"role": "user", "content": task.format(**fields)}] for task in TASKS]
    return out


def builtin_passages() -> list[str]:
    """128 passages cut from the notes: one, two or four sentences each (a quarter, half and a
    quarter of them), about 10 to 110 words, within a 256-token embedding model's limit."""
    sentences = [s.strip().rstrip(".") + "." for _, note in SUBJECTS for s in note.split(". ") if s.strip()]
    out = []
    for i in range(128):
        size = (1, 2, 2, 4)[i % 4]
        start = (i * 3) % len(sentences)
        out.append(" ".join(sentences[(start + j) % len(sentences)] for j in range(size)))
    return out


def builtin_queries() -> list[str]:
    return list(QUERIES)


def load_prompts(path: Path) -> list[list[dict]]:
    """A prompts file: JSON lines of ``{"messages": [...]}`` (a whole chat each), or plain lines
    (each one user message); blank lines are skipped. A line that is a JSON object must carry
    ``messages``, so a typo cannot silently turn a chat into text."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            item = None
        if isinstance(item, dict):
            messages = item.get("messages")
            if (
                not isinstance(messages, list)
                or not messages
                or not all(isinstance(m, dict) for m in messages)
            ):
                raise ValueError(f"{path}:{number}: a JSON line needs a non-empty list of messages")
            out.append(messages)
        else:
            out.append([{"role": "user", "content": line}])
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def load_lines(path: Path) -> list[str]:
    """A texts or queries file: one per line, blank lines skipped."""
    out = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not out:
        raise ValueError(f"{path}: no lines")
    return out


def cold_marker(run_id: str, tag: str, index: int) -> str:
    """A marker unique to the run (``run_id``), the level (``tag``) and the request. Its own hash
    opens it, not the run id: two markers of one run then differ from their second character on, so
    no prefix cache can reuse more than the chat template's shared part and the opening bracket."""
    digest = hashlib.sha256(f"{run_id}/{tag}/{index}".encode()).hexdigest()[:12]
    return f"[{digest}]"


def with_marker(messages: list[dict], marker: str) -> list[dict]:
    """The chat with ``marker`` opening its first user message (a system message stays shared, as
    in real traffic); the original is not changed."""
    out = copy.deepcopy(messages)
    target = next((m for m in out if m.get("role") == "user"), out[0])
    content = target.get("content")
    if isinstance(content, list):
        text_part = next((p for p in content if isinstance(p, dict) and p.get("type") == "text"), None)
        if text_part is None:
            content.insert(0, {"type": "text", "text": marker})
        else:
            text_part["text"] = f"{marker} {text_part.get('text', '')}"
    else:
        target["content"] = f"{marker} {content or ''}"
    return out
