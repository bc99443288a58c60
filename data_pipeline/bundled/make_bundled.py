"""Regenerate the bundled sample data (committed; run only after editing the facts below).

    python data_pipeline/bundled/make_bundled.py

The facts are short, general teaching summaries written for this project, for demos and tests of the
training pipeline only; they are not medical advice. Documents and QA pairs are composed from them
deterministically (seeded), so the held-out QA pairs ask about facts the training prose covers in
other words, and a model trained on it shows a falling held-out loss.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

# name: (definition, symptoms, diagnosis, treatment, complications, advice)
CONDITIONS = {
    "type 2 diabetes": (
        "a chronic disorder in which the body becomes resistant to insulin and the pancreas cannot make enough of it to keep blood glucose in range",
        "increased thirst, frequent urination, tiredness, blurred vision and slow healing of cuts, although many people have no symptoms for years",
        "a fasting plasma glucose of 7.0 mmol/L or higher, an HbA1c of 48 mmol/mol (6.5%) or higher, or a two-hour glucose tolerance test above 11.1 mmol/L",
        "weight loss, regular physical activity and metformin as the usual first drug, with SGLT2 inhibitors or GLP-1 receptor agonists added when heart or kidney disease is present",
        "heart attack, stroke, kidney failure, retinopathy, peripheral neuropathy and foot ulcers",
        "check your feet every day, keep your annual eye examination and bring your glucose diary to every visit",
    ),
    "hypertension": (
        "a persistently raised pressure of blood against the artery walls, usually without an identifiable single cause",
        "usually none at all, which is why it is called a silent condition; very high readings can cause headache or visual disturbance",
        "repeated clinic readings of 140/90 mmHg or higher confirmed by ambulatory or home blood pressure monitoring",
        "reducing salt, alcohol and weight, exercising, and drugs such as ACE inhibitors, calcium channel blockers or thiazide-like diuretics",
        "stroke, heart failure, coronary disease, kidney damage and dementia",
        "measure your blood pressure at home at the same time each day and keep taking your tablets even when you feel well",
    ),
    "asthma": (
        "a chronic inflammatory disease of the airways that causes variable and reversible narrowing of the bronchi",
        "wheeze, breathlessness, chest tightness and cough that are often worse at night or after exercise",
        "a typical history supported by spirometry showing reversible obstruction, a raised exhaled nitric oxide or variable peak flow readings",
        "an inhaled corticosteroid as the foundation of treatment, with a reliever inhaler and, if needed, a long-acting bronchodilator added",
        "severe attacks, status asthmaticus and, rarely, death when attacks are not treated quickly",
        "carry your reliever inhaler, learn your personal action plan and ask for your inhaler technique to be checked",
    ),
    "community-acquired pneumonia": (
        "an infection of the lung tissue acquired outside hospital, most often caused by Streptococcus pneumoniae",
        "fever, cough with sputum, breathlessness, pleuritic chest pain and, in older people, confusion",
        "clinical findings such as crackles on auscultation confirmed by a chest radiograph showing new consolidation",
        "antibiotics chosen according to severity, such as amoxicillin for mild cases, with oxygen and fluids in hospital for severe cases",
        "sepsis, pleural effusion, empyema, lung abscess and respiratory failure",
        "finish the whole course of antibiotics, rest, drink fluids and return if breathing becomes harder",
    ),
    "iron deficiency anaemia": (
        "a reduction in haemoglobin caused by too little iron, most often from blood loss or poor absorption",
        "fatigue, pallor, breathlessness on exertion, brittle nails and sometimes a craving to eat ice",
        "a low haemoglobin with small red cells and a low serum ferritin, followed by a search for the source of blood loss",
        "oral iron taken once daily or on alternate days, intravenous iron when tablets fail, and treatment of the underlying cause",
        "heart strain, poor pregnancy outcomes and delayed development in children",
        "take iron tablets with water or orange juice rather than tea, and expect dark stools while taking them",
    ),
    "hypothyroidism": (
        "an underactive thyroid gland that produces too little thyroxine, most commonly because of autoimmune Hashimoto thyroiditis",
        "tiredness, weight gain, feeling cold, constipation, dry skin and low mood",
        "a raised thyroid stimulating hormone with a low free thyroxine on a blood test",
        "daily levothyroxine, adjusted every six to eight weeks until the thyroid stimulating hormone is back in range",
        "raised cholesterol, heart disease and, very rarely, myxoedema coma",
        "take levothyroxine on an empty stomach at the same time each day, away from calcium and iron tablets",
    ),
    "atrial fibrillation": (
        "an irregular and often fast heart rhythm in which the atria quiver instead of contracting in an organised way",
        "palpitations, breathlessness, dizziness and tiredness, though it can be found by chance without symptoms",
        "an electrocardiogram showing an irregularly irregular rhythm with no visible P waves",
        "rate control with beta blockers, rhythm control in selected patients and anticoagulation when the stroke risk score is raised",
        "stroke from clots formed in the left atrium and heart failure when the rate stays high",
        "never stop an anticoagulant without speaking to your doctor and report any unusual bleeding",
    ),
    "heart failure": (
        "a syndrome in which the heart cannot pump enough blood to meet the needs of the body or can do so only at high filling pressures",
        "breathlessness on exertion or lying flat, swollen ankles, tiredness and waking at night short of breath",
        "a raised natriuretic peptide and an echocardiogram that shows the ejection fraction and structure of the heart",
        "diuretics for fluid overload and, when the ejection fraction is reduced, an ACE inhibitor or sacubitril-valsartan, a beta blocker, a mineralocorticoid antagonist and an SGLT2 inhibitor",
        "arrhythmias, kidney impairment, repeated hospital admissions and sudden death",
        "weigh yourself every morning and call your nurse if your weight rises by two kilograms in three days",
    ),
    "chronic obstructive pulmonary disease": (
        "a progressive lung disease with persistent airflow limitation, usually caused by long-term tobacco smoking",
        "chronic cough, sputum production and breathlessness that slowly worsens over years",
        "spirometry showing a post-bronchodilator FEV1 to FVC ratio below 0.7 in a person with symptoms and risk factors",
        "stopping smoking, pulmonary rehabilitation, long-acting bronchodilators and vaccination against influenza and pneumococcus",
        "exacerbations, respiratory failure, cor pulmonale and lung cancer",
        "stopping smoking is the single most effective step and your practice can refer you to a free service",
    ),
    "migraine": (
        "a primary headache disorder with recurrent attacks of moderate or severe headache and associated symptoms",
        "a throbbing one-sided headache with nausea and sensitivity to light and sound, sometimes preceded by a visual aura",
        "a clinical diagnosis based on the pattern of attacks and a normal neurological examination",
        "simple analgesics or triptans taken early in an attack, and preventive drugs such as propranolol or amitriptyline when attacks are frequent",
        "medication overuse headache and, rarely, migrainous stroke",
        "keep a headache diary and limit painkillers to fewer than ten days a month",
    ),
    "urinary tract infection": (
        "a bacterial infection of the bladder or kidneys, most often caused by Escherichia coli from the bowel",
        "burning on passing urine, frequency, urgency and lower abdominal pain, with fever and loin pain when the kidney is involved",
        "typical symptoms, with a urine culture in men, pregnant women, children and recurrent or complicated cases",
        "a short course of nitrofurantoin or trimethoprim for uncomplicated cystitis, guided by local resistance patterns",
        "pyelonephritis, sepsis and, in pregnancy, preterm labour",
        "drink plenty of fluids and seek help quickly if you develop fever, shivering or back pain",
    ),
    "gastro-oesophageal reflux disease": (
        "a condition in which stomach acid flows back into the oesophagus often enough to cause symptoms or damage",
        "heartburn, acid regurgitation and sometimes a chronic cough or hoarse voice",
        "a typical history with a response to treatment, and endoscopy when there are alarm features such as weight loss or difficulty swallowing",
        "weight loss, smaller evening meals, raising the head of the bed and a proton pump inhibitor for four to eight weeks",
        "oesophagitis, strictures and Barrett oesophagus",
        "avoid eating within three hours of going to bed and report any difficulty swallowing",
    ),
    "osteoarthritis": (
        "a degenerative joint disease in which cartilage is lost and the underlying bone remodels",
        "joint pain that worsens with use, brief morning stiffness and reduced range of movement, often in the knees, hips and hands",
        "a clinical diagnosis in people over 45 with typical symptoms, with radiographs only when the picture is unusual",
        "exercise, weight loss, topical anti-inflammatory gels, simple analgesia and joint replacement for severe disease",
        "disability, falls and reduced independence",
        "keep moving, since strengthening the muscles around a joint reduces pain over time",
    ),
    "rheumatoid arthritis": (
        "an autoimmune inflammatory arthritis that attacks the lining of the joints",
        "symmetrical pain and swelling of the small joints of the hands and feet with morning stiffness lasting more than an hour",
        "clinical synovitis with raised inflammatory markers and positive rheumatoid factor or anti-CCP antibodies",
        "early methotrexate as the anchor drug, short courses of steroids and biological agents when disease remains active",
        "joint destruction, cardiovascular disease, lung involvement and osteoporosis",
        "have your blood tests as scheduled while on methotrexate and take the weekly dose on the same day each week",
    ),
    "depression": (
        "a mood disorder with persistent low mood or loss of interest lasting at least two weeks and affecting daily function",
        "low mood, loss of pleasure, poor sleep, changes in appetite, poor concentration, guilt and thoughts of death",
        "a clinical interview using standard criteria, often supported by a questionnaire such as the PHQ-9, and an assessment of risk",
        "psychological therapies such as cognitive behavioural therapy and antidepressants such as sertraline for moderate or severe episodes",
        "self-harm, suicide and worsening of physical illness",
        "antidepressants usually take two to four weeks to help and should not be stopped suddenly",
    ),
    "generalised anxiety disorder": (
        "a condition of excessive and hard-to-control worry about many areas of life lasting at least six months",
        "restlessness, tiredness, poor concentration, irritability, muscle tension and disturbed sleep",
        "a clinical assessment using standard criteria, often with the GAD-7 questionnaire, after excluding thyroid disease and substance use",
        "guided self-help, cognitive behavioural therapy and, when needed, a selective serotonin reuptake inhibitor",
        "depression, alcohol misuse and social withdrawal",
        "regular exercise, limiting caffeine and practising slow breathing can ease symptoms",
    ),
    "chronic kidney disease": (
        "a reduction in kidney function or evidence of kidney damage present for more than three months",
        "usually none in the early stages, with tiredness, itching, swelling and nausea when function is very low",
        "an estimated glomerular filtration rate below 60 mL/min/1.73m2 or a raised urine albumin to creatinine ratio on repeated tests",
        "controlling blood pressure, an ACE inhibitor or angiotensin receptor blocker when albumin is raised, an SGLT2 inhibitor, and dialysis or transplant at end stage",
        "cardiovascular disease, anaemia, bone disease and kidney failure",
        "ask before taking anti-inflammatory painkillers because they can harm the kidneys",
    ),
    "stroke": (
        "a sudden loss of brain function caused by a blocked artery or bleeding into the brain",
        "sudden weakness of the face, arm or leg, slurred speech, loss of vision or loss of balance",
        "urgent brain imaging with computed tomography to separate an infarct from a haemorrhage",
        "thrombolysis within four and a half hours or thrombectomy for selected large-vessel occlusions, followed by antiplatelet therapy and rehabilitation",
        "disability, swallowing problems, aspiration pneumonia, depression and further strokes",
        "remember FAST: face, arms, speech, time to call the emergency number",
    ),
    "sepsis": (
        "a life-threatening organ dysfunction caused by a dysregulated response of the body to infection",
        "fever or low temperature, fast breathing, fast heart rate, confusion, mottled skin and little urine",
        "clinical suspicion of infection with signs of organ dysfunction, supported by lactate and blood cultures",
        "antibiotics within one hour, intravenous fluids, source control and vasopressors for persistent low blood pressure",
        "septic shock, multi-organ failure and death",
        "seek urgent help if someone with an infection becomes confused, very breathless or stops passing urine",
    ),
    "appendicitis": (
        "inflammation of the appendix, usually from obstruction of its lumen",
        "pain that starts around the navel and moves to the right lower abdomen, with loss of appetite, nausea and mild fever",
        "clinical examination with raised inflammatory markers and ultrasound or computed tomography when the diagnosis is uncertain",
        "appendicectomy, usually laparoscopic, with antibiotics; selected uncomplicated cases can be treated with antibiotics alone",
        "perforation, abscess and peritonitis",
        "do not ignore abdominal pain that is worsening and settling in one place",
    ),
    "deep vein thrombosis": (
        "a blood clot in a deep vein, usually in the leg",
        "a swollen, painful, warm leg, though some clots cause no symptoms",
        "a clinical probability score with a D-dimer test, followed by compression ultrasound",
        "anticoagulation with a direct oral anticoagulant such as apixaban for at least three months",
        "pulmonary embolism and post-thrombotic syndrome",
        "keep active on long journeys and report sudden breathlessness or chest pain at once",
    ),
    "coeliac disease": (
        "an immune reaction to gluten that damages the lining of the small intestine",
        "diarrhoea, bloating, weight loss, tiredness and iron deficiency, or few symptoms at all",
        "a positive tissue transglutaminase antibody test while eating gluten, confirmed by duodenal biopsy",
        "a strict lifelong gluten-free diet with dietitian support",
        "osteoporosis, anaemia and, rarely, intestinal lymphoma",
        "keep eating gluten until the tests are done, because a gluten-free diet can make the results falsely normal",
    ),
    "gout": (
        "an inflammatory arthritis caused by deposits of urate crystals in and around joints",
        "sudden severe pain, redness and swelling of a joint, classically the base of the big toe, often starting at night",
        "the clinical picture, with urate crystals seen in joint fluid and a serum urate measured after the attack settles",
        "anti-inflammatory drugs, colchicine or steroids for attacks and allopurinol to lower urate in recurrent gout",
        "recurrent attacks, tophi, joint damage and kidney stones",
        "drink plenty of water and reduce alcohol, sugary drinks and large portions of red meat",
    ),
    "psoriasis": (
        "a chronic immune-mediated skin disease with fast turnover of skin cells",
        "well-defined red plaques with silvery scale on the elbows, knees and scalp, and sometimes nail pitting",
        "a clinical diagnosis based on the appearance of the skin and nails",
        "emollients, topical steroids and vitamin D analogues, phototherapy, and systemic or biological drugs for extensive disease",
        "psoriatic arthritis, cardiovascular disease and low mood",
        "use emollients generously every day, even when the skin looks clear",
    ),
    "otitis media": (
        "an infection of the middle ear, common in young children",
        "ear pain, fever, irritability and a red bulging eardrum, sometimes with discharge if the drum perforates",
        "otoscopy showing a bulging or inflamed tympanic membrane",
        "pain relief and watchful waiting for two or three days, with antibiotics for young infants, both ears affected or persistent symptoms",
        "perforation, hearing loss and, rarely, mastoiditis",
        "give regular paracetamol or ibuprofen for pain and return if the child is still unwell after three days",
    ),
}


# General (non-medical) facts for replay and forgetting checks: topic -> sentences.
GENERAL = {
    "rivers": ["A river carries water from high ground towards the sea, a lake or another river.",
               "Its path is shaped over thousands of years by erosion on the outside of bends and deposits on the inside.",
               "Large rivers such as the Danube and the Mekong cross several countries and support fishing, farming and trade.",
               "Floods spread fertile silt across the plains, which is why many early towns grew beside rivers."],
    "bread": ["Bread is made from flour, water, salt and a raising agent such as yeast or a sourdough starter.",
              "Kneading develops gluten, a network of proteins that traps the gas produced during fermentation.",
              "A slow, cool rise gives the dough more flavour, while a hot oven sets the crust and the crumb.",
              "Flatbreads need no yeast at all and are among the oldest prepared foods."],
    "railways": ["The first public steam railways opened in the early nineteenth century and changed how people travelled.",
                 "A locomotive pulls carriages along steel rails, which reduce friction compared with roads.",
                 "Standard gauge, the distance between the rails, lets trains run across national borders.",
                 "Modern high-speed lines use electric trains and dedicated track with gentle curves."],
    "bees": ["Honey bees live in colonies with a single queen, thousands of workers and, in summer, some drones.",
             "Workers collect nectar and pollen, and they communicate the direction of flowers with a waggle dance.",
             "By visiting flowers, bees pollinate many crops, including apples, almonds and clover.",
             "A colony stores honey in wax combs to survive the winter."],
    "chess": ["Chess is played by two players on a board of sixty-four squares.",
              "Each side starts with sixteen pieces: a king, a queen, two rooks, two bishops, two knights and eight pawns.",
              "The aim is checkmate, a position in which the opposing king is attacked and cannot escape.",
              "Openings, middlegames and endgames each have their own principles, such as controlling the centre."],
    "volcanoes": ["A volcano forms where molten rock, called magma, reaches the surface of the Earth.",
                  "Many volcanoes lie along the edges of tectonic plates, for example around the Pacific Ocean.",
                  "Eruptions can produce lava flows, ash clouds and gases that affect the weather far away.",
                  "Volcanic soils are often rich, so farms and villages are found on the slopes of dormant volcanoes."],
    "libraries": ["A library lends books and other materials and offers a quiet place to read and study.",
                  "Catalogues and classification systems help readers find a book among many thousands.",
                  "Public libraries also provide internet access, courses and reading groups for children.",
                  "Some libraries keep rare manuscripts that are stored at controlled temperature and humidity."],
    "weather": ["Weather is the state of the atmosphere at a given place and time: temperature, wind, cloud and rain.",
                "Warm air rises, cools and releases its moisture as cloud and rain.",
                "Forecasters combine satellite images, weather balloons and computer models to predict the days ahead.",
                "Climate describes the average weather of a region over many years."],
    "bicycles": ["A bicycle turns the rider's pedalling into forward motion through a chain and gears.",
                 "Lower gears make climbing easier, while higher gears allow more speed on flat roads.",
                 "Regular care includes pumping the tyres, oiling the chain and checking the brakes.",
                 "In many cities, cycle lanes have made bicycles a common way to travel to work."],
    "music": ["Music combines rhythm, melody and harmony to express ideas and feelings.",
              "An orchestra groups strings, woodwind, brass and percussion under a conductor.",
              "Written notation records pitch and duration so that others can perform a piece.",
              "Folk songs were passed on by ear for generations before anyone wrote them down."],
    "forests": ["Forests cover about a third of the land on Earth and are home to most land animals and plants.",
                "Trees absorb carbon dioxide and release oxygen as they grow.",
                "Tropical rainforests are warm and wet all year, while boreal forests have long cold winters.",
                "Careful forestry replants what is cut so that the forest can recover."],
    "markets": ["A market is a place where buyers and sellers meet to exchange goods.",
                "Prices rise when demand grows faster than supply and fall when supply is plentiful.",
                "Weekly street markets sell fresh food, clothes and tools in many towns.",
                "Online markets now connect sellers and buyers who never meet in person."],
}
GENERAL_OPENERS = ["A short guide to {t}.", "Notes on {t}.", "What to know about {t}.", "An introduction to {t}."]


ASPECTS = ("definition", "symptoms", "diagnosis", "treatment", "complications", "advice")

QUESTIONS = {
    "definition": ["What is {c}?", "Explain {c} in simple terms.", "Define {c}.", "Give a short description of {c}."],
    "symptoms": ["What are the symptoms of {c}?", "How does {c} usually present?", "Which symptoms suggest {c}?",
                 "List the typical features of {c}."],
    "diagnosis": ["How is {c} diagnosed?", "What tests confirm {c}?", "How would a clinician confirm {c}?",
                  "Describe the diagnostic criteria for {c}."],
    "treatment": ["How is {c} treated?", "What is the management of {c}?", "Outline the treatment of {c}.",
                  "What are the treatment options for {c}?"],
    "complications": ["What are the complications of {c}?", "What can happen if {c} is not treated?",
                      "Name the main complications of {c}."],
    "advice": ["What advice would you give a patient with {c}?", "What should a patient with {c} remember?",
               "Give one practical tip for someone living with {c}."],
}

ANSWERS = {
    "definition": ["{C} is {x}.", "In short, {c} is {x}."],
    "symptoms": ["Typical symptoms of {c} are {x}.", "{C} usually presents with {x}."],
    "diagnosis": ["{C} is diagnosed by {x}.", "The diagnosis of {c} rests on {x}."],
    "treatment": ["Treatment of {c} includes {x}.", "Management of {c} involves {x}."],
    "complications": ["Complications of {c} include {x}.", "If {c} is poorly controlled it can lead to {x}."],
    "advice": ["A patient with {c} should know this: {x}.", "Practical advice for {c}: {x}."],
}

PATIENTS = ["A 58-year-old man", "A 34-year-old woman", "A 71-year-old woman", "A 45-year-old man", "A 6-year-old boy",
            "A 27-year-old woman", "An 82-year-old man", "A 63-year-old woman", "A 19-year-old student",
            "A 50-year-old lorry driver"]
SETTINGS = ["general practice", "the emergency department", "the medical admissions unit", "an outpatient clinic",
            "an out-of-hours service", "the community nursing team"]


# General chat prompts (general_prompts.txt): what a chat model is asked every day, on topics of their
# own (none of the general text's, the medical data's or the bundled lm-eval tasks'), for the model's
# own answers to be distilled on while it is fine-tuned (regularizer.distill.prompts). No format
# constraints: the instruction-following task (fullft_ifeval) probes those.
PROMPT_TOPICS = [
    "how glaciers form", "why leaves change colour in autumn", "how a compass works", "the rules of football",
    "how to start a vegetable garden", "what an atom is made of", "how a refrigerator keeps food cold",
    "the difference between weather and climate", "how to write a good email", "why we have seasons",
    "how a camera takes a picture", "the causes of earthquakes", "how to plan a weekly budget",
    "what makes a good friend", "how airplanes stay in the air", "the life cycle of a butterfly",
    "how to prepare for a job interview", "what electricity is", "how to learn to swim", "the invention of paper",
    "why the ocean is salty", "how vaccines were first discovered", "what a desert is", "how to make a cup of tea",
    "the history of the Olympic Games", "how a bridge carries weight", "what an election is",
    "how to take care of a houseplant", "why cats purr", "how a map shows height", "what inflation means",
    "how to read a timetable", "the first steps of a new hobby", "how sound travels", "what a museum does",
    "how a lighthouse helps ships", "why some animals hibernate", "how to organise a small party",
    "what a volcano island is", "how to keep a conversation going",
]
PROMPT_TASKS = [  # short answers: one cut off by regularizer.distill.answer_tokens is dropped
    "Explain {t} in a few sentences.",
    "In a short paragraph, tell me the most important things to know about {t}.",
    "I am a beginner. Briefly, can you help me understand {t}?",
]


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def fact(cond: str, aspect: str) -> str:
    return CONDITIONS[cond][ASPECTS.index(aspect)]


def textbook(cond: str, rng: random.Random) -> str:
    d, s, dx, tx, cx, adv = CONDITIONS[cond]
    return (f"{cap(cond)}. {cap(cond)} is {d}. Patients typically report {s}. The diagnosis is usually made by {dx}. "
            f"Management consists of {tx}. Important complications are {cx}. Patient education matters: {adv}.")


def clinical_note(cond: str, rng: random.Random) -> str:
    d, s, dx, tx, cx, adv = CONDITIONS[cond]
    who, where = rng.choice(PATIENTS), rng.choice(SETTINGS)
    return (f"Clinical note ({where}). {who} attended; presenting features were {s}. "
            f"The working diagnosis was {cond}, {d}. This was confirmed by {dx}. The plan agreed with the patient was "
            f"{tx}. We discussed the risk of {cx}. Safety-netting advice given: {adv}.")


def discharge_summary(cond: str, rng: random.Random) -> str:
    d, s, dx, tx, cx, adv = CONDITIONS[cond]
    who = rng.choice(PATIENTS)
    days = rng.randint(2, 9)
    return (f"Discharge summary. {who} was admitted for {days} days with {cond}. Presenting features: {s}. "
            f"Investigations: {dx}. Treatment given: {tx}. No evidence of {cx.split(',')[0]} during the stay. "
            f"Follow-up in {rng.choice(['one', 'two', 'four', 'six'])} weeks. Information given to the patient: {adv}.")


def leaflet(cond: str, rng: random.Random) -> str:
    d, s, dx, tx, cx, adv = CONDITIONS[cond]
    return (f"Patient information: living with {cond}. What is it? It is {d}. What might I notice? Many people notice "
            f"{s}. How will my doctor know? Usually by {dx}. What helps? {cap(tx)}. What are the risks? Without good "
            f"care there is a risk of {cx}. What can I do? {cap(adv)}.")


STYLES = (textbook, clinical_note, discharge_summary, leaflet)


def qa_pair(cond: str, aspect: str, rng: random.Random) -> dict:
    q = rng.choice(QUESTIONS[aspect]).format(c=cond)
    a = rng.choice(ANSWERS[aspect]).format(c=cond, C=cap(cond), x=fact(cond, aspect))
    record = {"instruction": q, "input": "", "output": a}
    if rng.random() < 0.25:   # some records carry context in `input`, as alpaca data often does
        record["instruction"] = f"Answer the question using the patient context. {q}"
        record["input"] = f"{rng.choice(PATIENTS)} seen in {rng.choice(SETTINGS)} has {cond}."
    return record


# Preference pairs for the medical recipe's `align` stage (DPO): the chosen answer is accurate and
# appropriately cautious; the rejected one is wrong (another condition's fact), overconfident
# (dismisses the need for care) or unsafe (advice that could harm).
CAUTIONS = ["This is general information; a clinician who knows your history should guide your care.",
            "Seek medical help promptly if symptoms get worse or new ones appear.",
            "Please discuss any change to your treatment with your doctor or pharmacist first.",
            "If you are unsure, ask your doctor, nurse or pharmacist to go through it with you."]
OVERCONFIDENT = ["There is no need to see a doctor about it; it never becomes serious.",
                 "I am completely certain about this, so you can skip any tests or check-ups.",
                 "It always settles on its own, whatever anyone tells you."]
UNSAFE = ["{C} is best handled at home: stop your prescribed medicines and take double the usual dose of painkillers "
          "until it settles.",
          "You can treat {c} yourself with antibiotics left over from a previous illness; there is no need to be seen.",
          "Ignore warning signs of {c} such as chest pain or confusion; they pass if you rest for a few days."]


def preference_pair(cond: str, aspect: str, rng: random.Random) -> dict:
    q = rng.choice(QUESTIONS[aspect]).format(c=cond)
    template = rng.choice(ANSWERS[aspect])
    answer = template.format(c=cond, C=cap(cond), x=fact(cond, aspect))
    chosen = f"{answer} {rng.choice(CAUTIONS)}"
    kind = rng.choice(("wrong", "overconfident", "unsafe"))
    if kind == "wrong":  # confidently states another condition's fact
        other = rng.choice([c for c in CONDITIONS if c != cond])
        rejected = f"{template.format(c=cond, C=cap(cond), x=fact(other, aspect))} {rng.choice(OVERCONFIDENT)}"
    elif kind == "overconfident":
        rejected = f"{answer} {rng.choice(OVERCONFIDENT)}"
    else:
        rejected = rng.choice(UNSAFE).format(c=cond, C=cap(cond))
    return {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def main() -> None:
    rng = random.Random(20261122)
    conditions = sorted(CONDITIONS)
    # Prose: every condition in every style for training; a held-out set in fresh random renderings.
    docs = [style(c, rng) for c in conditions for style in STYLES]
    docs += [style(c, rng) for c in conditions for style in (clinical_note, discharge_summary)]
    rng.shuffle(docs)
    held = [style(c, rng) for c in rng.sample(conditions, 8) for style in (clinical_note, discharge_summary)]
    (HERE / "medical_notes.txt").write_text("\n\n".join(docs) + "\n")
    (HERE / "medical_notes_heldout.txt").write_text("\n\n".join(held) + "\n")
    # General text: each topic rendered several times with its sentences in varied order.
    grng = random.Random(7)  # its own stream, so adding general text left the medical files unchanged
    gen_docs = []
    for topic, sentences in sorted(GENERAL.items()):
        for _ in range(6):
            order = sentences[:]
            grng.shuffle(order)
            gen_docs.append(" ".join([grng.choice(GENERAL_OPENERS).format(t=topic)] + order))
    grng.shuffle(gen_docs)
    (HERE / "general_text.txt").write_text("\n\n".join(gen_docs[:-12]) + "\n")
    (HERE / "general_text_heldout.txt").write_text("\n\n".join(gen_docs[-12:]) + "\n")
    # General prompts: every topic asked by a task in turn (no randomness: the file is stable as edited).
    prompts = [PROMPT_TASKS[i % len(PROMPT_TASKS)].format(t=t) for i, t in enumerate(PROMPT_TOPICS)]
    prompts += [PROMPT_TASKS[(i + 1) % len(PROMPT_TASKS)].format(t=t) for i, t in enumerate(PROMPT_TOPICS)]
    (HERE / "general_prompts.txt").write_text("\n".join(prompts) + "\n")
    # QA: each (condition, aspect) pair asked in several phrasings; one pair per condition held out.
    train, heldout = [], []
    for c in conditions:
        held_aspect = rng.choice(ASPECTS)
        for aspect in ASPECTS:
            if aspect == held_aspect:
                heldout.append(qa_pair(c, aspect, rng))
            else:
                train.extend(qa_pair(c, aspect, rng) for _ in range(2))
    rng.shuffle(train)
    for name, rows in (("medical_qa.jsonl", train), ("medical_qa_heldout.jsonl", heldout)):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Preference pairs: one per (condition, aspect), an aspect per condition held out (its own stream).
    prng = random.Random(14)
    prefs, prefs_held = [], []
    for c in conditions:
        held_aspect = prng.choice(ASPECTS)
        for aspect in ASPECTS:
            (prefs_held if aspect == held_aspect else prefs).append(preference_pair(c, aspect, prng))
    prng.shuffle(prefs)
    for name, rows in (("medical_prefs.jsonl", prefs), ("medical_prefs_heldout.jsonl", prefs_held)):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
