"""Post-training analysis: statistics, evaluation of every checkpoint, comparison of a grid."""
