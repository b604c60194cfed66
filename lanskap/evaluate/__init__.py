"""The evaluate stage, in the order it runs: features (CLIP and Inception features of images and captions),
metrics (CMMD, FID, KID, CLIP score on feature arrays), paired (LoRA-minus-base gaps over prompts: intervals and
tests), comparisons (the paper's comparisons and ours as flat metrics), report (report.md / report.html)."""
