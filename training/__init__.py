"""Training stack for DeiT with a teacher: data loading, DeiT-recipe transforms, collation, metrics and the Trainer."""
