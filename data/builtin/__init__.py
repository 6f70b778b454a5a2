"""The built-in default dataset, which needs no download: handwritten digit images (scikit-learn ships
them), synthesized telephone-keypad (DTMF) tones for the same digits, captions for both, and a text
stream of documents that installed packages ship. `files` writes it as image/WAV/text files and a
manifest; `cache` turns those into three prepared folders (images, tones, text) once per data config,
through the same `omnimoe prepare` code a user's data goes through. From there the default dataset is
a source like any other: data/pipeline/ trains and evaluates it from those folders.
"""
