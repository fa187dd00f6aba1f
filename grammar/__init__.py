"""The Lark grammar of the recipe language, shipped inside the package as ``squeezelang.grammar``."""
