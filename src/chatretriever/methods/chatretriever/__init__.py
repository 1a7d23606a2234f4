"""ChatRetriever (CSIT; Mao et al. 2024): the [EMB]-token session encoder, its one-pass forward,
its training data builders, collator, losses and recipe."""
