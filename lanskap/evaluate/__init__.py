"""The evaluate stage, in the order it runs: extraction (each image decoded once, in fixed batches shared out among
processes, through feature_cache) into features (CLIP and Inception features of images and captions), metrics
(CMMD, FID, CLIP score on feature arrays) and kid (KID with its standard error, on metrics' kernel sums), paired
(LoRA-minus-base gaps over prompts: intervals and tests), comparisons (the paper's comparisons and ours as flat
metrics), traits (the demo's scene-trait diagnostic), report (report.md / report.html)."""
