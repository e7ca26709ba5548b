"""Publishing: the model card (`model_card`, rendered from `templates/model_card.md`) and the one upload path
(`upload`) that `mimco-push` and every `--push_to_hub` use.
"""
