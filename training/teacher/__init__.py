"""The teacher: its model (`model`), its pre-flight check (`preflight`, on images `preflight_images` draws),
where its targets come from (`targets`: online or replayed), their record on disk (`store`) and its identity
(`identity`)."""
