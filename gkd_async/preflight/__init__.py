"""What `gkd-async run` checks before anything starts, from the config and the local files alone: the models,
tokenizers, data and reward agree (`checks`), and the run fits in memory (`memory`)."""
