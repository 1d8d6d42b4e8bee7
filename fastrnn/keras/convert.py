import keras

from fastrnn.keras.layers import GRU, LSTM, SimpleRNN

# Stock class name -> (stock class, fastrnn class).
_SWAPS = {
    "SimpleRNN": (keras.layers.SimpleRNN, SimpleRNN),
    "GRU": (keras.layers.GRU, GRU),
    "LSTM": (keras.layers.LSTM, LSTM),
}


def convert(model):
    """Copy of a Sequential or Functional ``model`` with every stock ``keras.layers.SimpleRNN``,
    ``keras.layers.GRU`` and ``keras.layers.LSTM`` replaced by ``fastrnn.keras.SimpleRNN`` /
    ``GRU`` / ``LSTM``, weights (and dropout seed states) kept.

    Layers inside wrappers (``Bidirectional``, ``TimeDistributed``, ...) and nested models are
    converted too; subclasses of the stock layers are left alone. The copy is built but not
    compiled: call ``compile`` on it. Subclassed models cannot be cloned by Keras; build those with
    the fastrnn layers directly. As with Keras's own ``clone_model``, a GRU's or LSTM's ``use_cudnn``
    (which its config does not keep) is back to ``"auto"`` in the copy.
    """
    if not _is_graph_model(model):
        raise TypeError(
            "fastrnn.keras.convert takes a Sequential or Functional keras model; got "
            f"{type(model).__name__}. Use fastrnn.keras.SimpleRNN / GRU / LSTM in subclassed models directly."
        )
    # Nested models reach _clone_layer whole and are rebuilt from their rewritten config, at any
    # depth (clone_model's own `recursive` is newer than Keras 3.3 and was one level deep for a while).
    converted = keras.models.clone_model(model, clone_function=_clone_layer)
    # All variables, not just weights: the seed-generator states too (SimpleRNN's config drops
    # `seed`), so the copy draws the same dropout masks as the original would.
    old, new = model.variables, converted.variables
    if len(old) == len(new) and all(o.shape == n.shape and o.dtype == n.dtype for o, n in zip(old, new)):
        for o, n in zip(old, new):
            n.assign(o)
    else:
        converted.set_weights(model.get_weights())
    return converted


def _is_graph_model(model):
    from keras.src.models.functional import Functional

    return isinstance(model, (keras.Sequential, Functional))


def _clone_layer(layer):
    # The stock SimpleRNN config drops the dropout seed; without it the copy would draw its masks
    # from torch's global RNG instead of the layer's seed generator. (GRU's and LSTM's configs keep it.)
    subs = layer._flatten_layers(include_self=True) if isinstance(layer, keras.layers.Layer) else []
    stock = tuple(cls for cls, _ in _SWAPS.values())
    seeds = {sub.name: sub.cell.seed for sub in subs if type(sub) in stock}
    if not seeds:
        return layer.__class__.from_config(layer.get_config())  # clone_model's default
    config = _swap_layers(keras.saving.serialize_keras_object(layer), seeds)
    return keras.saving.deserialize_keras_object(config)


def _swap_layers(config, seeds):
    """``config`` with each stock SimpleRNN / GRU / LSTM entry pointing at ours (and given its seed)."""
    if isinstance(config, list):
        return [_swap_layers(c, seeds) for c in config]
    if not isinstance(config, dict):
        return config
    swap = _SWAPS.get(config.get("class_name"))
    if swap is not None and config.get("module") == "keras.layers" and not config.get("registered_name"):
        fused = swap[1]
        name = config["config"].get("name")
        seed = seeds.get(name, config["config"].get("seed"))
        return {
            **config,
            "module": fused.__module__,
            "registered_name": keras.saving.get_registered_name(fused),
            "config": {**config["config"], "seed": seed},
        }
    return {k: _swap_layers(v, seeds) for k, v in config.items()}
