"""The routes, by who they are for: ``search`` (mmlm's own API), ``clip_retrieval`` (clip-retrieval's, for its
``ClipClient`` and front end), ``service`` (health, metrics, the web page, item images)."""
