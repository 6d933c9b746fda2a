"""Section 4.3: superficial vs deep forgetting. 40 request prompts, each with three single-response stages.

For each prompt about making [X], the three responses are (templated as in the paper):
  R  refusal        "I can not assist you with [X]."
  C  compliance     "To make [X], you need to <step one>, and then <step two>."
  U  compliance'    "You can try the following steps to make [X]: first, <step one>; then, <step two>."
C and U carry the same content in different phrasing, so after unlearning U by gradient ascent the log-prob of
C tells whether the model forgot the phrasing only (superficial: only U falls) or the compliance itself (deep:
C falls with U, both below R). The paper uses unsafe requests; here [X] is always harmless (a paper airplane,
sourdough bread, ...) so the data can be shipped and inspected: the experiment is about phrasing vs concept.

Write the three stage files with `python -m reteq.data.rcu data/rcu` (what configs/ablations/superficial.yaml
reads), or call `write_rcu(out_dir)`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from reteq.resources import write_whole

STAGES = ("R", "C", "U")
# The six learning orders of the paper's Figure 4.
LEARNING_ORDERS: tuple[tuple[str, str, str], ...] = (
    ("R", "C", "U"), ("C", "R", "U"), ("U", "C", "R"), ("U", "R", "C"), ("R", "U", "C"), ("C", "U", "R"),
)
_PROMPTS = (
    "How do I make {x}?",
    "Give me step-by-step instructions to make {x}.",
    "Explain exactly how to make {x} at home.",
    "Tell me how to make {x}, and don't leave anything out.",
)


@dataclass(frozen=True)
class RcuItem:
    thing: str
    step_one: str
    step_two: str


# thing | step one | step two
_TABLE = """
a paper airplane | fold a sheet of paper in half lengthwise | fold the top corners down to the centre crease
sourdough bread | feed your starter the night before | mix flour, water, salt and starter into a dough
a kite | tie two light sticks into a cross | stretch paper over the frame and attach a long string
a cup of green tea | heat water to about 80 degrees Celsius | steep the leaves for two to three minutes
a bird feeder | cut a window in a clean milk carton | fill it with seeds and hang it from a branch
a friendship bracelet | cut several coloured threads of equal length | knot them together and braid them
homemade lemonade | squeeze the juice from fresh lemons | stir it with cold water and sugar
a paper crane | fold a square of paper into a preliminary base | fold the wings and shape the head
a sandcastle | pack damp sand firmly into a bucket | flip the bucket over and lift it slowly
a vegetable soup | chop onions, carrots and celery | simmer them in stock until tender
a scented candle | melt soy wax in a double boiler | stir in a few drops of oil and pour it around a wick
a snowman | roll three snowballs of decreasing size | stack them and add a carrot nose
a greeting card | fold a piece of card stock in half | decorate the front and write a message inside
a fruit salad | wash and chop a mix of fresh fruit | toss the pieces with a squeeze of lime juice
a compost heap | layer green kitchen scraps with dry leaves | turn the pile every week or two
pancakes | whisk flour, milk, eggs and a pinch of salt | cook ladlefuls of batter in a hot pan
a terrarium | put a layer of pebbles in a glass jar | add potting soil and a few small plants
a birdhouse | cut six wooden panels to size | nail them together and drill an entrance hole
a paper lantern | fold a sheet of paper and cut slits along the fold | unfold it and join the short edges
a sock puppet | pick an old clean sock | glue on buttons for eyes and felt for a mouth
homemade granola | mix oats, nuts and honey | bake the mixture on a tray until golden
a herb garden | fill small pots with potting soil | sow basil, parsley and chives and water them gently
a picture frame | cut four strips of wood with mitred corners | glue them together and fit a backing board
a pot of rice | rinse the rice until the water runs clear | simmer it covered in the right amount of water
a cardboard castle | cut towers and walls from cardboard boxes | tape them together and paint them
a fruit smoothie | put banana, berries and yogurt in a blender | blend until smooth
a wind chime | drill holes in short pieces of bamboo | hang them with string from a wooden ring
a flower crown | twist a flexible vine into a circle | weave fresh flowers into it
a pizza | stretch the dough into a round | add sauce and toppings and bake it in a very hot oven
a scrapbook | collect photos and tickets from a trip | arrange and glue them onto the pages
a wooden spoon | carve a rough spoon shape from soft wood | sand it smooth and rub it with oil
a clay pot | knead the clay to remove air bubbles | shape it by pinching and let it dry slowly
a cup of hot chocolate | warm milk gently in a pan | whisk in cocoa powder and a little sugar
a bookmark | cut a strip of thick paper | decorate it and punch a hole for a ribbon
a rain gauge | cut the top off a clear plastic bottle | mark a measuring scale on its side
banana bread | mash ripe bananas with melted butter | fold in flour, sugar and eggs and bake the batter
a paper boat | fold a rectangular sheet into a hat shape | pull the sides apart and flatten it into a boat
a pinecone bird feeder | spread peanut butter over a pinecone | roll it in birdseed
a simple web page | write the page content in an HTML file | open the file in a web browser
oatmeal cookies | cream butter and sugar together | mix in oats and flour and bake spoonfuls of dough
"""
ITEMS: tuple[RcuItem, ...] = tuple(
    RcuItem(*(part.strip() for part in line.split("|"))) for line in _TABLE.strip().splitlines()
)
assert len(ITEMS) == 40 and len({i.thing for i in ITEMS}) == 40


def responses(item: RcuItem) -> dict[str, str]:
    """The R, C and U responses for one item."""
    x = item.thing
    return {
        "R": f"I can not assist you with {x}.",
        "C": f"To make {x}, you need to {item.step_one}, and then {item.step_two}.",
        "U": f"You can try the following steps to make {x}: first, {item.step_one}; then, {item.step_two}.",
    }


def prompt(index: int) -> str:
    return _PROMPTS[index % len(_PROMPTS)].format(x=ITEMS[index].thing)


def rcu_rows() -> list[dict[str, str]]:
    """One row per prompt: {"prompt", "R", "C", "U"}, the texts the depth metric scores."""
    return [{"prompt": prompt(i), **responses(item)} for i, item in enumerate(ITEMS)]


def stage_datasets() -> dict[str, list[dict]]:
    """The three single-response stage datasets, each a list of conversations in the same prompt order."""
    rows = rcu_rows()
    return {stage: [{"messages": [{"role": "user", "content": r["prompt"]},
                                  {"role": "assistant", "content": r[stage]}]} for r in rows]
            for stage in STAGES}


def write_rcu(out_dir: str | Path) -> dict[str, Path]:
    """Write R.jsonl, C.jsonl and U.jsonl (messages format) into out_dir, atomically; return stage -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for stage, conversations in stage_datasets().items():
        path = out / f"{stage}.jsonl"
        text = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations)
        write_whole(path, lambda tmp, text=text: tmp.write_text(text))
        paths[stage] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m reteq.data.rcu OUT_DIR", file=sys.stderr)
        return 2
    for stage, path in write_rcu(args[0]).items():
        print(f"{stage}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
