"""Example histories for the demo's one-click examples. The reviews are written for the demo
(not real Amazon reviews); their items are real catalog items, so their peers can be found."""
from __future__ import annotations

from typing import Mapping

CSV_GUITARIST = """item_title,rating,review_title,review_text
Snark SN1 Guitar Tuner,5,Fast and accurate,"I tune by ear most of the time, but on stage this little clip-on is faster than me. The display is bright enough for a dark bar and it grabs the note quickly, even on the low E. Battery has lasted months."
"D'Addario EXL110 Nickel Wound Electric Guitar Strings, Regular Light, 10-46",4,My default set,"These are the strings I keep coming back to. Bright for the first week, then they settle into a warm tone that suits my Strat. They hold tuning well after a day of stretching. Not the longest lasting, but cheap enough to change often."
Planet Waves Pro Winder String Winder and Cutter,5,Saves my wrists,"Restringing three guitars used to take an evening. The winder fits every peg I own and the cutter is sharp enough for wound strings. The built-in bridge pin puller is a nice touch for my acoustic."
Dunlop Pickholder (picks not included),3,Does the job,"It sticks to the mic stand and holds about six picks. The adhesive let go after a hot summer gig, so I added a strip of tape. Fine for the price, nothing more."
"""

JSONL_2014 = "\n".join([
    '{"reviewerID": "you", "asin": "B0002H0A3S", "overall": 5, "summary": "Sparkly and balanced", '
    '"reviewText": "On my dreadnought these give a sparkly top end without getting harsh, and the bass stays tight. '
    'I fingerpick mostly and the custom light gauge is easy on the hands. They last about two months for me.", '
    '"unixReviewTime": 1356998400}',
    '{"reviewerID": "you", "asin": "B0002E2KPC", "overall": 4, "summary": "Solid capo, slightly stiff", '
    '"reviewText": "Holds every string clean with no buzz, even at the fifth fret. The spring is stiff, so moving it '
    'mid-song takes two hands. The gold finish looks great on stage.", "unixReviewTime": 1362096000}',
    '{"reviewerID": "you", "asin": "B0006NDF8A", "overall": 5, "summary": "Sturdy stand", '
    '"reviewText": "The padding keeps the finish safe and the strap at the top stops the guitar from tipping when '
    'the dog runs by. Folds small enough for a gig bag pocket.", "unixReviewTime": 1367366400}',
])

JSONL_2023 = "\n".join([
    '{"user_id": "AE-EXAMPLE", "parent_asin": "B003VWJ2K8", "rating": 2, "title": "Flimsy clip", '
    '"text": "Reads the note fine, but the clip snapped after three months in my case. For a tuner that lives '
    'on the headstock that is not good enough.", "timestamp": 1690000000000}',
    '{"user_id": "AE-EXAMPLE", "parent_asin": "B0002F7K7Y", "rating": 3, "title": "Okay strings", '
    '"text": "They sound like every other nickel set. Rusted quickly in my humid basement. I expected them to last '
    'longer given the name.", "timestamp": 1692000000000}',
    '{"user_id": "AE-EXAMPLE", "parent_asin": "B0002CZVXM", "rating": 1, "title": "Came loose", '
    '"text": "One of the strap locks worked loose in the first week and my bass almost hit the floor. '
    'Installation instructions were useless.", "timestamp": 1694000000000}',
])

# The pasted-history examples: the form fields they fill, then one row per example.
PASTED_FIELDS = ("source", "history", "item_id", "item_title", "item_description", "rating", "review_title",
                 "reference")
PASTED = [
    ["paste", CSV_GUITARIST, "B004XNK7AI", "Snark SN-5 Tuner for Guitar, Bass and Violin", "", 4,
     "Good tuner, clumsy clip", ""],
    ["paste", JSONL_2014, None, "Fender 351 Shape Classic Celluloid Picks, 12 pack",
     "Medium gauge celluloid picks in mixed colors.", 5, "My go-to picks", ""],
    ["paste", JSONL_2023, "B0009G1E0K", "Protec Guitar Strap with Leather Ends and Pick Pocket, Black", "", 2,
     "Not for heavy basses", ""],
]


def pasted(catalog: Mapping[str, object]) -> list[list]:
    """The pasted-history examples, each product picked from the catalog only where the catalog holds it
    (another pool's catalog lacks these musical-instruments ids; the typed title stands alone then)."""
    item_id = PASTED_FIELDS.index("item_id")
    return [[value if n != item_id or value in catalog else None for n, value in enumerate(row)] for row in PASTED]


PASTED_LABELS = ["A guitarist's CSV → a clip-on tuner", "Amazon 2014 JSONL → a new product",
                 "Amazon 2023 JSONL, a critical reviewer → a strap"]
