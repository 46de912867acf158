"""The page's words and styles, kept apart from the code that places them."""

TITLE = "DEP Studio: personalized review generation"
# Who the reviewers of each bundled pool are, by its folder's name; another pool is named by its folder.
POOLS = {"amazon-mi-2014": "Amazon reviewers of musical instruments",
         "amazon-gift-cards-2018": "Amazon reviewers of gift cards"}

INTRO = """
# DEP Studio · reviews in a person's own voice

A small language model (SmolLM2-135M) is given a **product**, the **star rating** and the **title** of a review,
and writes the review text twice, side by side: as a **generic reviewer** would, and **personalized with DEP**
(*difference-aware embedding-based personalization*, [Qiu et al. 2025](https://arxiv.org/abs/2507.20849)). DEP
shows the model a few of the person's past reviews, and next to each one two compact hints: ***his***, an embedding
of what that review says, and ***diff***, an embedding of how it differs from what *other* people wrote about the
same product. The generic reviewer gets the very same prompt, this person's past reviews included, with the
average reviewer's hints, so what differs between the two is what the hints add.

*Honest note:* on held-out users the two sides score about the same. The person reaches this model mostly
through the past reviews, which both sides see; to see the person, **compare two reviewers** (below the outputs).
The numbers are under *What the measurements say*.

**How to use:** ① choose a bundled reviewer (or paste your own reviews) · ② their real, held-out review's product
is filled in, so you can compare · ③ press **Generate**. Or click one of the examples at the bottom.
"""

# Filled from the adapter's shipped evaluation (demo/measurements.py).
MEASUREMENTS = """
On {users} held-out users ({draws}): ROUGE-1 {dep_rouge:.3f} personalized against {generic_rouge:.3f} generic, METEOR
{dep_meteor:.3f} against {generic_meteor:.3f}; the plain model without any history, selectable under ③, scores
{plain_rouge:.3f} and {plain_meteor:.3f}. An authorship test ranks a personalized text first for its author among 20
reviewers {dep_top1:.0%} of the time, a generic one {generic_top1:.0%} (the real reviews {real_top1:.0%}; chance 5%).
With another person's hints the personalized side's ROUGE-1 changes by {shuffled_gap:+.3f}. The past reviews carry
most of what this small model takes from a person; the hints add too little for one sampled text to show. The
adapter's model card (`assets/adapter/README.md`) reports the evaluation, and `experiments/README.md` every
attempt; read the outputs as what the method does today.
"""

PAPER_PRESET = """**The paper preset:** the authors' released DEP checkpoint, `{llm}` with their SAE and projectors
(`{adapter}`), each request built exactly as their code builds it (BGE-M3 vectors, their history, peers, prompt and
marker tokens: `docs/paper-preset.md`). It writes DEP beside the plain LLM; K, the signals, the strength and the
generic comparison belong to this project's adapter and do not apply."""

PAPER_MODES_NOTE = ("the paper preset writes DEP (texts, his and diff) beside the plain LLM: the chosen signals "
                    "and comparison do not apply to the authors' checkpoint")

NO_MEASUREMENTS = """No evaluation ships with this adapter. `python -m dep_engine evaluate --adapter FOLDER` measures
it on held-out users (and `pool` averages several draws); put the output in `FOLDER/evaluation/` to show it here."""

UNTRAINED = """⚠️ **The DEP adapter in this build is untrained.** The *his* and *diff* hints are random projections,
so today the personalized output differs from the baseline through the past-review texts (and noise) only.
Train the adapter with `python -m dep_engine train`, then start the app with `--adapter runs/adapter`."""

HOW_IT_WORKS = """
### How it works, for researchers
1. **History selection.** K of the user's past reviews: the ones most *relevant* to the product (cosine between
   the product's and the review's MiniLM embeddings), or the K most *recent* whose items have other reviewers
   (the paper's rule). Only reviews written before the held-out review are used.
2. **Peers.** For each selected review, the other users who reviewed the same item (before the target's time).
   Items nobody else reviewed borrow the reviewers of the nearest items (*cold start*).
3. **Differences.** diff = Σ w_r (e_user − e_peer_r); the weights w are a softmax of how far each peer's mean
   embedding is from the user's, at the *peer temperature* (higher → more uniform).
4. **Adapter.** A sparse autoencoder turns each his and diff vector into a sparse code (plotted in *SAE
   codes*); two small projectors map the codes to soft tokens in the LLM's embedding space.
5. **Prompt.** Each past review is shown as the chat's earlier answer to a request for its own item, its his and
   diff soft tokens in that request; the product to review is the last request, and the frozen LLM writes the
   answer (as earlier answers, not quoted, the person's reviews are read better and drift less to past items).
   The generic baseline uses the same prompt with the population's average his and diff vectors
   (the *strength* slider moves between the two: 0 generic, 1 this user). Both prompts are decoded together in
   one batch with the same seed; neither may write "[" (the prompt's field labels open with one), and each is cut
   where it starts echoing a label or repeating itself; a text that reaches *max new tokens* mid-sentence ends
   at its last full sentence.

*Signals* picks the ablation: texts alone is RAG; his / diff / his + diff without texts use the embeddings only;
all three is DEP. Texts with only one of the two embeddings has no mode in the method, so it is refused.
The metrics compare one sample against one real review: a single example is noisy, not a benchmark.
*Whose voice is it?* measures each text as the evaluation does: the rank of this reviewer among 20 (the
evaluation averages over every set of 20) by the cosine between the text and each one's past reviews (MiniLM
embedding plus voice features: length, sentence length, punctuation, first person, capitals, vocabulary,
openings), and drift: closer to a past review's item than to the product.
"""

API_HELP = """
### Use it from Python
```python
from gradio_client import Client
client = Client("http://127.0.0.1:7860/")
client.predict(limit=5, api_name="/users")                     # bundled users
out = client.predict(user_id="{user}", max_new_tokens=60, api_name="/review")
out["baseline"], out["personalized"], out["metrics"], out["voice_check"], out["prompt"]
client.predict(history=open("assets/examples/my_reviews.csv").read(), item_title="Snark SN-5 Tuner",
               rating=4, review_title="Handy", strength=1.5, api_name="/review")
client.predict(user_id="{user}", other_user_id="{other}", api_name="/compare")
```
"""

COMPARE_HELP = ("The reviewer chosen in ① and a second one write about the product in ② with the settings "
                "in ③ and the same seed, decoded together: what differs is the person.")
READY = "Press **Generate** to write both reviews."
STOPPED = "■ Stopped. The model finishes the batch it was decoding before the next run starts."
PAST_REVIEWS_HELP = ("The K past reviews put in the prompt, with their relevance to the product "
                     "(cosine similarity of embeddings).")
PEERS_HELP = ("For each past review, the other people who reviewed the same item and their "
              "weight in the difference embedding (weights of one review sum to 1).")
SAE_HELP = ("A **sparse autoencoder (SAE)** rewrites each *his* and *diff* vector as a set of features, most of "
            "them off; the adapter turns these codes into soft tokens. **How to read it:** one row per past "
            "review, one column per feature, brighter = more active; a column bright in every row is a "
            "feature this user always shows, a bright spot in one row belongs to that review alone.")
SIGNALS_HELP = ("*his*: an embedding (a vector of numbers standing for the meaning) of each past review. *diff*: "
                "how that review differs from what other people wrote about the same item. Both reach the model "
                "as **soft tokens**: vectors placed in the prompt where words would be, that the model reads "
                "like words but no one can type.")
VOICE_HEAD = ("**Whose voice is it?** Each text ranked against the past reviews of this reviewer and of "
              "{others} other bundled reviewers (1: closest to this reviewer's; by chance about {chance:.1f}), "
              "and whether it stays on the product:")
VOICE_NOTE = ("<small>One text is one draw. On {users} held-out users ({draws}), DEP's texts ranked their author "
              "first {dep_top1:.0%} of the time, the generic reviewer's {generic_top1:.0%}, the real reviews "
              "{real_top1:.0%}; {drift_low:.0%}-{drift_high:.0%} of either side's texts drift to a past review's item "
              "(the adapter's model card).</small>")
COMPARE_VOICE = ("\n\n**Whose voice is it?** Among {candidates} reviewers (the reviewer and {others} other bundled "
                 "ones), the first text ranks its reviewer **{first}** of {candidates}, the second **{second}** of "
                 "{candidates} (1: closest to that reviewer's past reviews; by chance about {chance:.1f}).")
TERMS_HELP = "Words and phrases this user writes more (and less) than the peers who reviewed the same items."
TERMS_NOTE = ("\n\n<small>Words and two-word phrases of the past reviews used, against the other reviews of the "
              "same items; ranked by the log-odds ratio with an informative prior from the whole pool "
              "(Monroe et al. 2008). This is read from the texts; the diff embeddings encode such "
              "differences for the model.</small>")

CSS = """
.dep-banner { border: 1px solid #f59e0b; background: #fffbeb; border-radius: 8px; padding: 8px 14px; }
.dep-banner, .dep-banner * { color: #78350f !important; }
#status .dep-error { color: #b91c1c; }
.dep-step { margin-top: 6px; }
#baseline textarea, #personalized textarea { font-size: 15px; line-height: 1.45; }
#baseline [data-testid="block-info"], #personalized [data-testid="block-info"] { margin-right: 36px; }
#baseline .icon-button-wrapper, #personalized .icon-button-wrapper { z-index: 10; }
footer { margin-top: 12px; }
mark.dep-mark { background: #ddd6fe; color: #3b0764; border-radius: 3px; padding: 0 2px; }
#terms-text p { margin: 0 0 10px 0; line-height: 1.5; }
#action-bar { position: fixed; left: 0; right: 0; bottom: 0; z-index: 1000; margin: 0; padding: 8px max(16px, 3vw);
  max-width: none; background: var(--body-background-fill); box-shadow: 0 -6px 14px -8px rgba(0, 0, 0, 0.3); }
#action-bar button { max-width: 320px; }
.gradio-container { padding-bottom: 72px !important; }
#selected th, #selected th *, #peers th, #peers th *, #metrics th { white-space: nowrap !important; word-break: keep-all; }
#selected .virtual-row, #peers .virtual-row, #user-history .virtual-row, #table .virtual-row,
#selected th, #peers th, #user-history th, #table th { font-family: var(--font) !important; font-size: 13px; }
"""

# On load: a click into a search box (reviewer, catalog) selects its text, so typing replaces the long
# label instead of being inserted into it.
JS = """
() => {
  document.addEventListener('focusin', (event) => {
    const box = event.target;
    if (box.matches && box.matches('#user_id input, #other-user input, #item_id input')) {
      setTimeout(() => box.select(), 0);
    }
  });
}
"""

END_AT_USER_LENGTH_HELP = ("Both reviews end at their first full sentence once they reach the median length of "
                           "this user's past reviews. Nearer a real review's length and quicker; on validation "
                           "users ROUGE-1 rose and METEOR fell, so it is off by default.")
