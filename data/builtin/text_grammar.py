"""The words and sentence templates the built-in text corpus is written from (data/builtin/text_corpus.py).

An imaginary country described in short paragraphs: its towns, rivers, animals, dishes, history,
weather, workshops, fairs and letters home. All of it is this project's own text. A paragraph has
one topic; its opening sentence comes first, then some of the topic's other sentences. Slots in
braces are filled from the word lists below, once per paragraph, so a paragraph keeps talking about
the same town, river or person. `{Slot}` is the capitalised form of `{slot}`.
"""

SYLLABLES = ("var", "en", "holt", "mir", "ask", "tor", "lun", "bre", "dal", "kes", "ori", "fen",
             "gal", "wyn", "sel", "ard", "ith", "mor", "cal", "bey", "rin", "ost", "ula", "nem",
             "tam", "ely", "sko", "dre", "har", "vil", "pon", "quen")
TOWN_ENDINGS = ("", "", "ford", "mere", "by", "stead", "wick", "ton", "haven", "bury")
RIVER_WORDS = ("River", "Water", "Stream")
HILL_WORDS = ("Hills", "Heights", "Uplands", "Fells", "Downs")

WORDS = {
    "size": ("small", "quiet", "busy", "old", "walled", "crowded", "sleepy", "market"),
    "side": ("east", "west", "north", "south"),
    "direction": ("north", "south", "east", "west", "north-east", "south-west"),
    "good": ("wool", "barley", "salt", "timber", "cheese", "flax", "copper", "honey", "slate"),
    "animal": ("goat", "marten", "otter", "badger", "fox", "hare", "lynx", "stoat", "beaver"),
    "build": ("small", "stocky", "slender", "large", "quick", "shy"),
    "crop": ("barley", "oats", "beans", "turnips", "rye", "flax", "cabbages", "apples"),
    "weekday": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"),
    "season": ("spring", "summer", "autumn", "winter"),
    "month": ("March", "April", "May", "June", "July", "August", "September", "October"),
    "material": ("stone", "oak", "brick", "iron", "pine", "granite", "larch"),
    "food": ("bread", "smoked fish", "plum cake", "bean soup", "goat cheese", "onion pie"),
    "building": ("chapel", "granary", "old mill", "clock tower", "school", "customs house"),
    "tree": ("willows", "alders", "poplars", "birches", "ash trees", "hazels"),
    "bird": ("swallows", "wagtails", "herons", "kingfishers", "warblers", "coots"),
    "fish": ("trout", "eels", "perch", "pike", "salmon", "carp"),
    "water": ("high and brown", "fast and cold", "low and clear", "wide and slow"),
    "colour": ("grey", "brown", "reddish", "pale", "dark", "speckled", "sandy"),
    "tail": ("short", "long", "bushy", "striped", "thin"),
    "diet": ("roots and berries", "insects", "small fish", "seeds", "grass and bark", "mice"),
    "dish": ("a barley stew", "a river fish pie", "a honey loaf", "a bean broth", "a cabbage bake"),
    "vegetable": ("onions", "carrots", "leeks", "turnips", "beans", "parsnips", "beetroots"),
    "grain": ("barley", "rye flour", "oats", "lentils", "dried peas"),
    "fat": ("butter", "lard", "oil", "goose fat"),
    "herb": ("thyme", "dill", "sage", "parsley", "caraway", "mint"),
    "cooked": ("golden", "soft", "brown at the edges", "thick", "glossy"),
    "trade": ("potter", "weaver", "smith", "carpenter", "cooper", "rope maker", "bookbinder"),
    "product": ("chest", "barrel", "rug", "plough", "jug", "cart wheel", "ledger"),
    "relative": ("an uncle", "a grandmother", "an aunt", "a neighbour", "a grandfather"),
    "sky": ("cold and still", "thin and bright", "damp and warm", "heavy with mist"),
    "sign": ("a red sunset means a dry day", "low swallows mean rain", "a ring round the moon "
             "means wind", "mist in the valley means a fine afternoon"),
    "instrument": ("fiddles", "drums", "pipes", "a small harp", "an old accordion"),
    "game": ("tug of war", "a footrace", "a ploughing contest", "a cheese roll", "a rowing race"),
    "feeling": ("tired but well", "cold but cheerful", "glad to be moving", "a little homesick"),
}
PLURAL = {"goat": "goats", "marten": "martens", "otter": "otters", "badger": "badgers",
          "fox": "foxes", "hare": "hares", "lynx": "lynxes", "stoat": "stoats",
          "beaver": "beavers"}
PRONOUNS = (("she", "her"), ("he", "his"))

# Drawn numbers: slot -> (lowest, highest, step).
NUMBERS = {"year": (1540, 1890, 1), "later": (12, 80, 1), "people": (800, 24000, 100),
           "km": (40, 420, 5), "mills": (3, 14, 1), "kg": (2, 30, 1), "young": (2, 6, 1),
           "minutes": (10, 90, 5), "families": (9, 60, 1), "rain": (90, 210, 1),
           "hour": (5, 8, 1), "days": (2, 12, 1), "price": (3, 40, 1), "stalls": (30, 300, 10),
           "streets": (4, 40, 1), "age": (11, 16, 1)}

# topic -> (openings, body sentences, keep body order). A paragraph is one opening and 2..6 body
# sentences: drawn without repeats, kept in the order listed when the topic tells a sequence.
TOPICS = {
    "town": ((
        "{Town} is a {size} town on the {side} bank of the {River}.",
        "Travellers coming down from the {Hills} reach {Town} after a day's walk.",
    ), (
        "Its {streets} streets run down to a quay where {good} is loaded onto barges.",
        "Most families in {Town} keep a few {animals} and grow {crop} behind their houses.",
        "The market is held every {weekday}, and in {season} it fills the square until dusk.",
        "A {material} bridge, built in {year}, joins the old quarter to the new one.",
        "People say the {food} of {Town} is the best in the valley.",
        "The council meets in a narrow hall beside the {building}.",
        "About {people} people live there, fewer than a century ago.",
        "Its {building} was rebuilt in {year} after a fire.",
    ), False),
    "river": ((
        "The {River} rises in the {Hills} and flows {direction} for {km} kilometres.",
        "Few rivers of the region change as much through the year as the {River}.",
    ), (
        "In {season} the water runs {water}, and the fords near {Town} cannot be crossed.",
        "Its banks are lined with {tree}, and {bird} nest in the reeds.",
        "Fishermen take {fish} from its lower reaches.",
        "Once {mills} mills stood along it; only one still turns.",
        "Barges carry {good} downstream to {Town} in the weeks after the thaw.",
        "A ferry crosses it below {Town}, where the valley is widest.",
    ), False),
    "animal": ((
        "The {animal} of the {Hills} is a {build} animal with {colour} fur and a {tail} tail.",
        "Walkers in the {Hills} often see the {animal} at dawn.",
    ), (
        "It feeds on {diet} and stays close to its den in the coldest weeks.",
        "Shepherds say it can be heard calling at dusk in {month}.",
        "A grown {animal} weighs about {kg} kilograms.",
        "Its young are born in {month}, {young} at a time.",
        "Farmers near {Town} do not like it, because it raids their stores of {crop}.",
        "In {season} its coat turns {colour}, which hides it against the ground.",
    ), False),
    "recipe": ((
        "To make {dish}, you need {vegetable}, {grain} and a little {fat}.",
        "Here is how {dish} is made in the kitchens of {Town}.",
    ), (
        "First, wash the {vegetable} and cut them into small pieces.",
        "Warm the {fat} in a heavy pan over a low fire.",
        "Add the {vegetable} and stir until they turn {cooked}.",
        "Pour in the {grain} with two cups of water and a pinch of {herb}.",
        "Let it cook for {minutes} minutes, stirring now and then.",
        "Serve it warm with bread, or cold the next morning.",
    ), True),
    "history": ((
        "In {year}, {Person} led {families} families from {Town} to settle the {Hills}.",
        "The settlement in the {Hills} began with {Person}, a farmer from {Town}.",
    ), (
        "The first winter was hard, and many of them went back.",
        "Those who stayed built houses of {material} and cleared the land for {crop}.",
        "Within {later} years the settlement had its own school and a small library.",
        "{Person}'s diary, kept in the archive at {Town}, tells the journey day by day.",
        "The road they cut along the {River} is still used by carts today.",
    ), True),
    "weather": ((
        "The weather in the {Hills} changes quickly.",
        "Nobody in the {Hills} trusts a forecast for more than a day.",
    ), (
        "On a clear morning in {month} the air is {sky}, but by noon clouds may gather.",
        "Rain falls on about {rain} days of the year.",
        "The wind comes mostly from the {direction}, and in {season} it smells of the sea.",
        "Old farmers read the sky: {sign}.",
        "Snow can close the pass above {Town} from the first frost until {month}.",
    ), False),
    "craft": ((
        "{Person} is a {trade} in {Town}.",
        "The best {trade} in {Town} is {Person}, who works alone.",
    ), (
        "Every morning {pronoun} opens the workshop at {hour} and lights the stove.",
        "{Pronoun} works mostly with {material}, bought from a trader on the {River}.",
        "A good {product} takes {days} days to finish.",
        "{Pronoun} learned the trade from {relative} at the age of {age}.",
        "Buyers come from as far as the {Hills} to order a {product}.",
        "On {weekday} afternoons {pronoun} teaches two apprentices.",
    ), False),
    "fair": ((
        "The {season} fair at {Town} draws people from the whole valley.",
        "Every {season}, {Town} holds a fair on the meadow by the {River}.",
    ), (
        "There are about {stalls} stalls, most of them selling {good} and {food}.",
        "This year {good} sold for {price} coins a sack.",
        "In the evening there is music on {instrument}, and the dancing goes on late.",
        "The favourite contest is {game}, which the young people of {Town} usually win.",
        "Traders come by barge along the {River} and sleep on board.",
    ), False),
    "letter": ((
        "Dear {Friend}, we reached {Town} on {weekday} evening after {days} days on the road.",
    ), (
        "The inn is small but clean, and the owner keeps a {animal} by the fire.",
        "Tomorrow we follow the {River} {direction} towards the {Hills}.",
        "The food here is simple; tonight it was {food}.",
        "We are {feeling}.",
        "Give my regards to everyone at home.",
        "Yours, {Person}.",
    ), True),
}
