"""Hidden-rationale retrieval (issue 16): the RaHoRe binary-choice reranker, its supervised and
DPO tuning, Rabtriever distillation into a bi-encoder student, and the ESConv tasks.

Modules: `tasks` (ESConv strategy / response retrieval, splits, class prior; torch-free),
`prompts` (the two wordings, prompt token ids), `scoring` (one-pass option logits with and
without a document's KV cache), `reranker` (`BinaryChoiceReranker`), `tuning` (SFT and DPO
data and training), `tuned_adapter` (a tuned adapter's recorded settings), `distill` (the
Rabtriever encoder, predictor and losses), `distill_train` (training the predictor),
`distill_recipe` (the `rerank-distill` recipe and feature cache), `student`
(`RabtrieverStudent`, the saved student).
"""
