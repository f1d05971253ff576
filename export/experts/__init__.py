"""Expert tools on exported packages: extract, prune (``moechat experts``)."""
